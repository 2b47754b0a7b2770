"""Careless and hostile input (issue 13): every row of the issue's table, run as a user would.

Each case must end with a non-zero exit, exactly one line on stderr, no traceback, no "internal
error", within a time bound. The few rows that are not errors (a capped thread count, `-n 0`, a
missing GPU) are checked for the one line they must print.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input import CASES as HOSTILE_GGUFS
from test_bad_input import _kv_str, tiny_llama

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.gguf"
BOUND_S = 60.0   # generous: a loaded 2-core CI machine imports numba in ~10 s
BOMB = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"


def cli(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=None):
    full = {k: v for k, v in os.environ.items() if k not in ("NUMALLM_DEBUG", "NUMALLM_KERNEL")}
    full.update(env or {})
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "numallm", *args], stdin=stdin, stdout=stdout,
                       stderr=subprocess.PIPE, text=True, env=full, timeout=BOUND_S * 2)
    r.elapsed = time.monotonic() - t
    return r


def one_line(r, *needles, bound=BOUND_S) -> str:
    err = r.stderr.strip()
    assert r.returncode != 0, (r.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert r.elapsed < bound, f"took {r.elapsed:.1f} s: {err}"
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("careless")
    fifo = d / "fifo.gguf"
    os.mkfifo(fifo)
    bomb = d / "bomb.jinja"
    bomb.write_text(BOMB)
    return {
        "stories": str(STORIES),
        "heads0": tiny_llama(d / "heads0.gguf", heads=0),
        "heads3": tiny_llama(d / "heads3.gguf", heads=3),    # 8 does not divide over 3 heads
        "missing": tiny_llama(d / "missing.gguf", drop="blk.0.ffn_up.weight"),
        "bomb_gguf": tiny_llama(d / "bomb.gguf", extra_kvs=[_kv_str("tokenizer.chat_template", BOMB)]),
        "bomb_file": str(bomb),
        # found by tests/fuzz: a norm stored as I8 (type 24), which gguf-py cannot dequantize
        "int_norm": tiny_llama(d / "int_norm.gguf", types={"blk.0.ffn_norm.weight": 24}),
        "fifo": str(fifo),
    }


SAMPLING = [  # flags refused before anything loads: (flags, what the line must name)
    (["-t", "-2"], ["-t -2", "at least 1"]),
    (["-t", "0"], ["-t 0"]),
    (["--min-p", "2"], ["--min-p 2", "from 0 to 1"]),
    (["--temp", "nan"], ["--temp nan"]),
    (["--temp", "inf"], ["--temp inf"]),
    (["--temp", "-1"], ["--temp -1.0", "at least 0"]),
    (["--repeat-penalty", "0"], ["--repeat-penalty 0.0", "above 0"]),
    (["--repeat-penalty", "-1"], ["--repeat-penalty -1.0"]),
    (["--top-p", "5"], ["--top-p 5.0", "from 0 to 1"]),
    (["--top-k", "-3"], ["--top-k -3", "at least 0"]),
    (["--repeat-last-n", "-2"], ["--repeat-last-n -2"]),
    (["-n", "-2"], ["-n -2", "until end of text"]),
    (["--seed", "-5"], ["--seed -5"]),
    (["-c", "-5"], ["-c -5"]),
]


@pytest.mark.parametrize("verb", ["run", "chat"])
@pytest.mark.parametrize("flags,needles", SAMPLING, ids=[" ".join(f) for f, _ in SAMPLING])
def test_bad_option_is_one_line(files, verb, flags, needles):
    prompt = ["hi"] if verb == "run" else []
    one_line(cli(verb, files["stories"], *prompt, *flags), "numallm: error:", *needles, bound=30)


TABLE = {  # name: (argv with {file} names, needles, extra env, stdout)
    "chat_template_missing": (["chat", "{stories}", "--chat-template", "/missing.jinja"],
                              ["--chat-template /missing.jinja", "does not exist"], {}),
    "chat_template_dir": (["chat", "{stories}", "--chat-template", "/"], ["not a regular file"], {}),
    "info_heads0": (["info", "{heads0}"], ["attention.head_count = 0"], {}),
    "run_heads0": (["run", "{heads0}", "hi", "-n", "1"], ["attention.head_count = 0"], {}),
    "chat_heads0": (["chat", "{heads0}"], ["attention.head_count = 0"], {}),
    "plan_heads0": (["plan", "{heads0}"], ["attention.head_count = 0"], {}),
    "info_heads_do_not_divide": (["info", "{heads3}"], ["attention.head_count = 3", "divide"], {}),
    "run_chat_template_bomb": (["run", "{bomb_gguf}", "hi", "--chat", "-n", "1"],
                               ["refused", "loop iterations"], {}),
    "chat_template_file_bomb": (["chat", "{stories}", "--chat-template", "{bomb_file}"],
                                ["refused", "loop iterations"], {}),
    "run_integer_norm": (["run", "{int_norm}", "hi", "-n", "1"], ["ffn_norm.weight", "I8"], {}),
    "info_missing_tensor": (["info", "{missing}"], ["blk.0.ffn_up.weight is missing"], {}),
    "info_negative_ctx": (["info", "{stories}", "-c", "-5"], ["-c -5"], {}),
    "fifo": (["run", "{fifo}", "hi"], ["not a regular file"], {}),
    "info_fifo": (["info", "{fifo}"], ["not a regular file"], {}),
    "dev_zero": (["run", "/dev/zero", "hi"], ["not a regular file"], {}),
    "dev_null": (["info", "/dev/null"], ["not a regular file"], {}),
    "kernel_unknown_type": (["run", "{stories}", "hi", "-n", "1"], ["NUMALLM_KERNEL", "'q9_9'"],
                            {"NUMALLM_KERNEL": "q9_9:avx2"}),
    "kernel_unknown_variant": (["info", "{stories}"], ["NUMALLM_KERNEL", "no variant 'bogus'"],
                               {"NUMALLM_KERNEL": "bogus"}),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_table_row_is_one_line(files, case):
    argv, needles, env = TABLE[case]
    one_line(cli(*(a.format(**files) for a in argv), env=env), "numallm: error:", *needles)


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUFS))
@pytest.mark.parametrize("verb", ["info", "plan"])
def test_hostile_gguf_other_verbs(tmp_path, case, verb):
    """test_bad_input runs each hostile file through `run`; info and plan read it too."""
    build, needles = HOSTILE_GGUFS[case]
    path = build(tmp_path / f"{case}.gguf")
    if verb == "plan" and case in ("missing_tensor", "wrong_shape"):
        needles = []   # plan reads the header only, so it may not see the tensor problem
    r = cli(verb, str(path))
    if r.returncode == 0 and not needles:
        return
    one_line(r, "numallm: error:", *needles)


def test_output_to_dev_full(files):
    with open("/dev/full", "w") as full:
        r = cli("info", files["stories"], stdout=full)
    one_line(r, "numallm: error:", "cannot write the output", "No space left")


def test_closed_stdout_and_gone_reader(files):
    r = subprocess.run(f"{sys.executable} -m numallm info {files['stories']} >&-", shell=True,
                       capture_output=True, text=True, env=dict(os.environ, NUMALLM_DEBUG=""))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "standard output is closed" in r.stderr and "Traceback" not in r.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)          # the reader is gone before the first write
    try:
        r = cli("info", files["stories"], stdout=write_end)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r


def test_threads_over_cores_capped_with_one_line(files):
    r = cli("run", files["stories"], "Once", "-n", "2", "--temp", "0", "-t", "999")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "-t 999" in ln]
    assert len(lines) == 1 and f"using {len(os.sched_getaffinity(0))} threads" in lines[0], r.stderr


def test_n_0_means_prompt_only(files):
    import json

    r = cli("run", files["stories"], "Once upon a time", "-n", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == [] and out["text"] == "" and out["prompt_tokens"] > 1


def test_bench_without_gpu_says_so(files):
    r = cli("bench", files["stories"], "-ngl", "2", "-p", "0", "-n", "2", "-r", "1", "--bw-mib", "1",
            "-t", "1", "--numa", "off", env={"CUDA_VISIBLE_DEVICES": "-1", "NUMALLM_FAKE_GPUS": ""})
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stderr.splitlines() if "no GPU (" in ln]
    assert len(line) == 1 and "running every layer on the CPU" in line[0], r.stderr


def test_plan_auto_without_gpu_blames_the_gpu(files):
    r = cli("plan", files["stories"], "-ngl", "auto",
            env={"CUDA_VISIBLE_DEVICES": "-1", "NUMALLM_FAKE_GPUS": ""})
    assert r.returncode == 0, r.stderr
    assert "no GPU" in r.stdout and "fits on no" not in r.stdout, r.stdout


# -- the library side of the same rules --------------------------------------------------------

def test_sampling_params_refuse_out_of_range():
    from numallm.errors import OptionError
    from numallm.sampling import SamplingParams

    for bad in ({"top_p": 5}, {"min_p": -0.1}, {"temperature": float("nan")}, {"top_k": -3},
                {"repeat_penalty": 0}, {"repeat_last_n": -2}, {"seed": -1}, {"temperature": "hot"}):
        with pytest.raises(OptionError) as e:
            SamplingParams(**bad)
        assert isinstance(e.value, ValueError)
        (name, value), = bad.items()
        assert f"{name}={value!r}" in str(e.value)
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, repeat_last_n=-1, seed=0)   # edges pass


def test_threads_checked_in_library():
    from numallm.errors import OptionError
    from numallm.threads import check_threads, usable_cpus

    for bad in (0, -2, 1.5, True):
        with pytest.raises(OptionError):
            check_threads(bad)
    n, note = check_threads(usable_cpus() + 5, "n_threads")
    assert n == usable_cpus() and "n_threads" in note
    assert check_threads(1) == (1, None) and check_threads(None) == (None, None)


@pytest.fixture(scope="module")
def stories():
    import numallm

    if not STORIES.exists():
        pytest.skip("stories260K.gguf absent")
    with numallm.load(str(STORIES), n_ctx=48, n_threads=999) as llm:
        yield llm


def test_max_tokens_same_meaning_as_cli(stories):
    from numallm.errors import OptionError

    assert stories.pool.n_threads <= len(os.sched_getaffinity(0)) and stories.threads_note
    r = stories.generate("Once upon a time", max_tokens=0, temperature=0)
    assert r.tokens == [] and r.text == "" and r.finish_reason == "length" and r.prompt_tokens > 1
    for unbounded in (None, -1):
        r = stories.generate("Once upon a time", max_tokens=unbounded, temperature=0)
        assert r.finish_reason == "stop" or r.prompt_tokens + r.generation_tokens == 48
    assert len(stories.generate("Once", max_tokens=3, temperature=0).tokens) <= 3
    with pytest.raises(OptionError):
        stories.generate("Once", max_tokens=-2)


TEMPLATE_BOMBS = {
    "nested_range": BOMB,
    "string_loops": "{% set s = 'x' * 4000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "huge_output": "{% for i in range(99999) %}{{ 'x' * 4000 }}{% endfor %}",
    "repeat": "{{ 'x' * 10000000000 }}",
    "power": "{{ 2 ** 100000000 }}",
    "doubling": "{% set x = 'aaaaaaaa' %}" + "{% set x = x ~ x %}" * 40 + "{{ x|length }}",
    "namespace_doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                          "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "replace": "{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}",
    "padding": "{{ 'x'.ljust(10000000000) }}",
    "const_filter": "{{ 'x'|center(10000000000) }}",
    "format_width": "{{ '%0999999999d' % 1 }}",
    "str_format_width": "{{ '{:>999999999}'.format(1) }}",
    "macro_args": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                  "{{ f('ab', 60) }}",
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_BOMBS))
def test_template_bomb_refused_fast_with_bounded_memory(case):
    import tracemalloc

    from numallm.chat_template import ChatTemplate, ChatTemplateError

    msgs = [{"role": "user", "content": "hi"}]
    tracemalloc.start()
    t = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError, match="refused|too deeply"):
            ChatTemplate(TEMPLATE_BOMBS[case]).render(msgs)
        elapsed = time.monotonic() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 10.0, elapsed          # MAX_SECONDS is 2; tracing and a loaded CI slow it
    assert peak < 200 << 20, peak            # MAX_CHARS is 4 Mi characters


def test_real_templates_still_render():
    """The budget stays far from what real templates need: a long conversation renders."""
    from numallm.chat_template import ChatTemplate

    tpl = ("{% for m in messages %}{% if loop.first and m.role == 'system' %}<s>{{ m.content }}"
           "{% else %}[{{ m.role|upper }}] {{ m.content|trim }}{% endif %}\n{% endfor %}"
           "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 50}
            for i in range(400)]
    out = ChatTemplate(tpl).render(msgs)
    assert out.count("[USER]") == 200 and out.endswith("[ASSISTANT]")


def test_first_run_announced_once_on_a_terminal_only(tmp_path, files):
    """A new CPU (an empty calibration cache): one line before the long first load, on a
    terminal; nothing when stderr is a pipe or with --json."""
    import pty

    env = {"NUMALLM_CACHE_DIR": str(tmp_path)}
    piped = cli("run", files["stories"], "Once", "-n", "1", env=env)
    assert piped.returncode == 0 and "first run" not in piped.stderr

    def on_terminal() -> str:
        pid, fd = pty.fork()
        if pid == 0:
            os.environ.update(env)
            os.execv(sys.executable, [sys.executable, "-m", "numallm", "run", files["stories"],
                                      "Once", "-n", "1"])
        out = b""
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        os.waitpid(pid, 0)
        os.close(fd)
        return out.decode("utf-8", "replace")

    assert on_terminal().count("first run on this CPU") == 1
    assert "first run" not in on_terminal()    # once per CPU, even for an F32 model
