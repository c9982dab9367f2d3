#include "cpu/threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace refpg {

namespace {

int available_cores() {
  cpu_set_t set;
  const int n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                              : static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(n, 1, kMaxThreads);
}

// Workers sleep on a condition variable between jobs, after watching for the next one for kSpin
// (a decode step queues hundreds of small jobs microseconds apart; waking a sleeping thread costs
// tens of microseconds each time). Never spinning longer: an unbounded spinning pool next to
// OpenBLAS's threads on a 2-core machine collapses.
constexpr auto kSpin = std::chrono::microseconds(50);

template <class Done>
void spin_until(Done done) {
  const auto start = std::chrono::steady_clock::now();
  while (!done() && std::chrono::steady_clock::now() - start < kSpin) _mm_pause();
}

class Pool;
Pool& pool();

// The pool's size and its workers change only under job_mutex_, which every job holds from start to
// end: a resize waits for the running job, and a job never sees a pool being rebuilt. Workers start
// with the first job after the pool is made, resized or forked.
class Pool {
 public:
  explicit Pool(int n) : threads_(n) {
    pthread_atfork([] { pool().before_fork(); }, [] { pool().after_fork_in_parent(); },
                   [] { pool().after_fork_in_child(); });
  }

  int size() const { return threads_.load(std::memory_order_relaxed); }

  void resize(int n) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);  // waits for the running job
    if (n == size()) return;
    stop();
    threads_ = n;
  }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t chunks_max = (n + grain - 1) / grain;
    // inside a job (a kernel calling a kernel) the work stays on this thread
    if (in_job || chunks_max <= 1 || size() <= 1) return fn(0, n);
    std::unique_lock<std::mutex> job_lock(job_mutex_);  // one job at a time
    start();
    const int parts = static_cast<int>(std::min<int64_t>(workers_.size() + 1, chunks_max));
    if (parts <= 1) {  // the pool shrank to one thread meanwhile, or no worker could be started
      job_lock.unlock();
      return fn(0, n);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      grain_ = grain;
      parts_ = parts;
      pending_ = parts - 1;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    std::exception_ptr mine;  // the workers still use fn and its captures: wait for them first
    try {
      run_part(0);
    } catch (...) {
      mine = std::current_exception();
    }
    spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

  // fork() copies only the thread that calls it. before_fork waits for the running job and holds
  // the job lock across the fork; the parent then lets it go. The child's copy of the pool names
  // workers that do not exist there (joining them would hang, destroying their joinable
  // std::thread handles would terminate), and locks and condition variables whose state may
  // involve those threads: it forgets them all, unjoined, and starts from fresh ones.
  void before_fork() { job_mutex_.lock(); }
  void after_fork_in_parent() { job_mutex_.unlock(); }
  void after_fork_in_child() {
    new (&workers_) std::vector<std::thread>();  // the old handles are leaked, never destroyed
    new (&job_mutex_) std::mutex();
    new (&mutex_) std::mutex();
    new (&cv_) std::condition_variable();
    new (&done_cv_) std::condition_variable();
    stopping_ = false;
    pending_ = 0;
  }

 private:
  // Called with the job lock held. Starts size() - 1 workers when there are none; if the system
  // gives fewer threads, the pool is as large as what started.
  void start() {
    if (!workers_.empty() || size() <= 1) return;
    stopping_ = false;
    try {
      for (int i = 1; i < size(); ++i) workers_.emplace_back([this, i, g = generation_.load()] { loop(i, g); });
    } catch (const std::exception&) {  // no thread (system_error) or no memory for one (bad_alloc)
      threads_ = static_cast<int>(workers_.size()) + 1;
    }
  }

  void run_part(int part) {
    const int64_t chunks = (n_ + grain_ - 1) / grain_;
    const int64_t begin = chunks * part / parts_ * grain_;
    const int64_t end = std::min(n_, chunks * (part + 1) / parts_ * grain_);
    struct InJob {
      InJob() { in_job = true; }
      ~InJob() { in_job = false; }
    } scope;
    if (begin < end) (*fn_)(begin, end);
  }

  static thread_local bool in_job;

  void loop(int index, uint64_t seen) {
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (index >= parts_) continue;
      }
      std::exception_ptr err;
      try {
        run_part(index);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (err && !error_) error_ = err;
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::atomic<int> threads_;  // workers + the calling thread; written under job_mutex_
  std::vector<std::thread> workers_;
  std::mutex job_mutex_, mutex_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int parts_ = 0;
  std::atomic<int> pending_{0};         // written under mutex_, read by spin_until without it
  std::atomic<uint64_t> generation_{0};
  bool stopping_ = false;
  std::exception_ptr error_;
};

thread_local bool Pool::in_job = false;

// Never destroyed: the workers are not joined at exit, so nothing can run on a destroyed pool (a
// daemon thread's kernel, a fork handler).
Pool& pool() {
  static Pool* p = new Pool(available_cores());
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) { pool().resize(n <= 0 ? available_cores() : std::min(n, kMaxThreads)); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  pool().run(n, std::max<int64_t>(1, grain), fn);
}

}  // namespace refpg
