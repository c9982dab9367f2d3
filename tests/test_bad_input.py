"""Bad input gets a clear error, never a traceback, hang or silent garbage: CLI flags, environment
variables and API arguments, each named in the message (the CLI: one line on stderr, exit code 2).

tests/test_fuzz_inputs.py holds the seeded fuzz cases — every CLI flag value, environment variable
value and API misuse its cli_cases, env_cases and api_cases run is checked there only; this file
keeps what the fuzz lacks: the README's example, diff's exit codes, dump/diff's default model,
--version, a few flag values and dumps of other kinds, REFPG_CHECK's words, REFPG_THREADS at import,
a SIMD path this CPU lacks with --backend cpp, zero-size images, and API misuse the fuzz has not."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest

from conftest import ROOT, assert_one_line_error, run_cli, run_python, simd_paths_here
from refpg import PaliGemma, Processor
from refpg.backend import BackendError, Selection
from refpg.model import InputError
from refpg.processor import ProcessorError

TINY = os.path.join(ROOT, "tests", "data", "tiny-random")  # shipped, 3 + 3 layers, no torch needed
IMAGE = os.path.join(TINY, "image0.png")


def generate(*flags: str, env: dict | None = None):
    return run_cli("generate", "--model", TINY, "--image", IMAGE, *flags, env=env)


# ---- CLI flags ----------------------------------------------------------------------------------

# Each flag value here is checked once: those the fuzz cases in tests/test_fuzz_inputs.py also run
# (cli_cases: --temperature nan/inf/-1/1e-310, --top-k 0, --top-p 1.5/nan, --max-new-tokens -1,
# --draw, --prompt empty/whitespace/not UTF-8, --backend gpu / matmul=cpp,attention, demo --out,
# --model a file, dump --decode -1, diff against a missing dump, one without meta.json, one of
# another prompt) are there only.
@pytest.mark.parametrize("flags, needle", [
    (["--prompt", "caption en", "--seed", "-1"], "--seed"),  # greedy (the fuzz case samples)
    (["--prompt", "caption en", "--max-new-tokens", "ten"], "--max-new-tokens"),
    (["--prompt", "caption en", "--bogus"], "unrecognized arguments: --bogus"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_generate_flags_are_one_line_errors_naming_the_flag(flags, needle):
    assert_one_line_error(generate(*flags), needle)


@pytest.fixture(scope="module")
def tiny_dump(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dump") / "tiny.npz")
    result = run_cli("dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--decode", "2",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def rewrite_dump(src: str, dst: str, change) -> str:
    with np.load(src) as z:
        entries = {k: z[k] for k in z.files}
    change(entries)
    np.savez(dst, **entries)
    return dst


@pytest.mark.parametrize("make, needle", [
    (lambda d, tmp: (tmp / "junk.npz").write_bytes(b"PK\x03\x04 garbage") and str(tmp / "junk.npz"),
     "not an activation dump"),  # a zip header (the fuzz case's garbage reads as a pickle)
    (lambda d, tmp: rewrite_dump(d, str(tmp / "badmeta.npz"),
                                 lambda e: e.update({"meta.json": np.array('{"format": "other/9"}')})), "other/9"),
    (lambda d, tmp: rewrite_dump(d, str(tmp / "badname.npz"),
                                 lambda e: e.update({"stuff": np.zeros(3)})), "'stuff'"),
    (lambda d, tmp: rewrite_dump(d, str(tmp / "strings.npz"),
                                 lambda e: e.update({"prefill/logits": np.array(["a", "b"])})), "not real numbers"),
], ids=["garbage", "other-format", "bad-entry-name", "string-entry"])
def test_diff_against_a_garbage_or_foreign_dump_is_a_one_line_error(tiny_dump, tmp_path, make, needle):
    b = make(tiny_dump, tmp_path)
    assert_one_line_error(run_cli("diff", "--model", TINY, "--image", IMAGE, "--prompt", "caption en",
                                  "--decode", "2", "--b", b), needle)


def test_diff_exit_code_is_0_when_the_runs_agree_and_1_when_they_part(tiny_dump, tmp_path):
    same = run_cli("diff", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--decode", "2",
                   "--b", tiny_dump)
    assert same.returncode == 0, same.stderr
    moved = rewrite_dump(tiny_dump, str(tmp_path / "moved.npz"),
                         lambda e: e.update({"prefill/text.1": e["prefill/text.1"] * 1.01}))
    parted = run_cli("diff", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--decode", "2",
                     "--b", moved)
    assert parted.returncode == 1, parted.stderr
    assert "first activation beyond max rel 0.001: prefill/text.1" in parted.stdout


def test_dump_and_diff_default_to_the_demo_model(tmp_path):
    out = tmp_path / "demo.npz"
    result = run_cli("dump", "--image", IMAGE, "--prompt", "caption en", "--out", str(out))
    assert result.returncode == 0, result.stderr
    result = run_cli("diff", "--image", IMAGE, "--prompt", "caption en", "--b", str(out))
    assert result.returncode == 0, result.stderr
    assert "no divergence" in result.stdout


def test_version_and_python_dash_m_refpg():
    import refpg

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"refpg {refpg.__version__}"
    assert run_cli("--help").returncode == 0


# ---- environment ------------------------------------------------------------------------------
# A bad REFPG_THREADS (a word, 2.5, 0, negative, past 1024), REFPG_SIMD, REFPG_BACKEND or REFPG_CHECK
# with the default backend: the fuzz's env_cases, each error naming the variable and its value.

def test_bad_environment_variables_fail_whatever_the_backend():
    pytest.importorskip("refpg._C", reason="REFPG_THREADS and REFPG_SIMD configure the native kernels")
    for env in ({"REFPG_THREADS": "\u00b2"}, {"REFPG_SIMD": "sse9"}):  # "²" is a digit to str.isdigit
        assert_one_line_error(generate("--prompt", "caption en", "--backend", "numpy", env=env),
                              next(iter(env)))


def test_refpg_threads_sets_the_kernels_thread_count_at_import():
    pytest.importorskip("refpg._C", reason="REFPG_THREADS configures the native kernels")
    result = run_python(["-c", "import refpg; from refpg import _C; print(_C.num_threads())"], env={"REFPG_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr


def test_a_simd_path_this_cpu_lacks_is_a_one_line_error():
    paths = simd_paths_here()  # the op table's reading: the kernels' cpu_features, the OS's AMX permission included
    if all(why == "cpp not built" for why in paths.values()):
        pytest.skip("cpp not built: REFPG_SIMD configures the native kernels")
    lacking = next((path for path in ("amx", "avx512") if paths[path] is not None), None)
    if lacking is None:
        pytest.skip("this CPU has every SIMD path refpg can be forced to")
    assert_one_line_error(generate("--prompt", "caption en", "--backend", "cpp", env={"REFPG_SIMD": lacking}),
                          f"REFPG_SIMD={lacking}", "lacks" if lacking == "avx512" else "no AMX")


def test_refpg_check_reads_yes_and_no_words(monkeypatch):
    for value, on in (("0", False), ("false", False), ("No", False), ("1", True), ("TRUE", True), ("on", True)):
        monkeypatch.setenv("REFPG_CHECK", value)
        assert Selection.from_spec("numpy").check is on, value


# ---- API arguments ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_batch():
    proc = Processor.from_pretrained(TINY)
    return PaliGemma.from_pretrained(TINY, backend="numpy"), proc(images=[IMAGE], prompts=["caption en"])


# The misuse the fuzz cases in tests/test_fuzz_inputs.py also run (api_cases: batch not a dict or
# without input_ids, max_new_tokens 2.5 / "3" / -1, temperature NaN, top_k 2.5, token_type_ids strings
# or 2, attention_mask of another shape, pixel_values NaN or strings, each an InputError naming the
# argument) is there only.
@pytest.mark.parametrize("call, needle", [
    (lambda m, b: m.generate(b, seed=-1), "seed must be an integer >= 0"),  # greedy (the fuzz case samples)
    (lambda m, b: m.generate({**b, "pixel_values": b["pixel_values"][:0]}), "pixel_values must be"),
    (lambda m, b: m.new_cache(max_len=10 ** 9), "exceeds the model's max_position_embeddings"),
    (lambda m, b: m.new_cache(batch_size=0), "batch_size must be an integer >= 1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_api_misuse_raises_input_error_naming_the_argument(model_and_batch, call, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        call(*model_and_batch)


@pytest.mark.parametrize("image", [np.zeros((0, 8, 3), np.uint8), np.zeros((8, 0, 3), np.uint8),
                                   PIL.Image.new("RGB", (0, 5)), PIL.Image.new("RGBA", (5, 0))],
                         ids=["array-0-rows", "array-0-cols", "pil-0-wide", "pil-rgba-0-high"])
def test_zero_size_images_are_processor_errors(image):
    with pytest.raises(ProcessorError, match="no pixels"):
        Processor.from_pretrained(TINY)(images=[image], prompts=["caption en"])


def test_a_prompt_with_lone_surrogates_is_a_processor_error():
    with pytest.raises(ProcessorError, match="not UTF-8"):
        Processor.from_pretrained(TINY)(images=[IMAGE], prompts=["caption \udcff en"])


def test_backend_spec_of_the_wrong_type_is_a_backend_error():
    with pytest.raises(BackendError, match="string or a dict"):
        Selection.from_spec(["cpp"])


def test_the_readme_python_example_runs_as_written():
    """The README promises that its API block runs as written, on the shipped demo model."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Python API"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    scope: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), scope)
    assert scope["text"] == "a green square and a blue square"  # the demo block's scene 1 caption
    assert scope["step"].shape == (1,) and scope["logits"].shape[:2] == scope["batch"]["input_ids"].shape
