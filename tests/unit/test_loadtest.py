"""Load-test plumbing without a server: locust stats CSV -> summary, the memory-growth detector, load shapes,
payload handling and the locustfile lookup."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import random
import sys
import time
from pathlib import Path

import pytest
from braintumor.loadtest import memory, runner
from braintumor.loadtest import stats as locust_stats

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"


@pytest.fixture(scope="module")
def shapes():
    sys.path.insert(0, str(LOADTEST))
    try:
        yield importlib.import_module("shapes")
    finally:
        sys.path.remove(str(LOADTEST))


@pytest.fixture(scope="module")
def payloads():
    sys.path.insert(0, str(LOADTEST))
    try:
        yield importlib.import_module("payloads")
    finally:
        sys.path.remove(str(LOADTEST))


# A stats CSV as locust 2.47 writes it (header copied from a real run; numbers made up).
STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,/analyze,34,0,490,462.1,165,754,9000.0,4.28,0.0,490,540,550,560,610,670,750,750,750,750,750
POST,/explain gradcam,6,1,860,726.0,303,1083,12000.0,0.76,0.12,860,860,870,870,1100,1100,1100,1100,1100,1100,1100
GET,/explain/get,0,0,0,0.0,0,0,0.0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
,Aggregated,40,1,300,392.3,4,1083,9500.0,5.04,0.12,300,430,520,550,670,870,1100,1100,1100,1100,1100
"""


def test_read_stats_parses_rows_and_total(tmp_path):
    path = tmp_path / "http_stats.csv"
    path.write_text(STATS_CSV)
    stats = locust_stats.read_stats(path)
    assert [s.name for s in stats] == ["/analyze", "/explain gradcam", "/explain/get", "total"]
    analyze, gradcam, get, total = stats
    assert (analyze.type, analyze.requests, analyze.failures, analyze.rps) == ("POST", 34, 0, 4.28)
    assert (analyze.p50_ms, analyze.p95_ms, analyze.p99_ms, analyze.max_ms) == (490, 670, 750, 754)
    assert gradcam.failures == 1
    assert (get.p50_ms, get.p99_ms) == (None, None)  # "N/A": no requests of that name
    assert (total.requests, total.failures, total.rps, total.p95_ms) == (40, 1, 5.04, 870)


def test_read_stats_refuses_other_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a locust stats CSV"):
        locust_stats.read_stats(path)


def test_format_table_and_failures(tmp_path):
    path = tmp_path / "http_stats.csv"
    path.write_text(STATS_CSV)
    table = locust_stats.format_table(locust_stats.read_stats(path)).splitlines()
    assert table[0] == "| request | reqs | fails | req/s | p50 ms | p95 ms | p99 ms |"
    assert table[2] == "| POST /analyze | 34 | 0 | 4.28 | 490 | 670 | 750 |"
    assert table[4] == "| GET /explain/get | 0 | 0 | 0.00 | - | - | - |"
    assert table[-1] == "| **total** | 40 | 1 | 5.04 | 300 | 870 | 1100 |"
    failures = tmp_path / "http_failures.csv"
    failures.write_text('Method,Name,Error,Occurrences\nPOST,/explain gradcam,"HTTP 503: down",1\n')
    assert locust_stats.read_failures(failures) == [{"name": "/explain gradcam", "error": "HTTP 503: down", "occurrences": 1}]
    assert locust_stats.read_failures(tmp_path / "absent.csv") == []


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1m5s", 65)])
def test_parse_duration(text, seconds):
    assert runner.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "1.5m"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="time span"):
        runner.parse_duration(text)


# -- memory growth --------------------------------------------------------------------------------------------

def _series(minutes: float, every_s: float, slope_mb_per_min: float, noise_mb: float = 0.0, start: float = 500.0):
    rng = random.Random(0)
    times = [k * every_s for k in range(int(minutes * 60 / every_s) + 1)]
    return times, [start + slope_mb_per_min * t / 60 + rng.uniform(-noise_mb, noise_mb) for t in times]


def test_growth_slope_exact_on_a_line():
    times, values = _series(20, 10, 3.0)
    assert memory.growth_slope(times, values) == pytest.approx(3.0)


def test_growth_slope_uses_only_the_second_half():
    # warm-up: +200 MB over the first 10 minutes, then flat: a filling cache, not a leak
    times = [k * 10.0 for k in range(121)]
    values = [300 + min(t, 600) / 3 for t in times]
    assert memory.growth_slope(times, values) == pytest.approx(0.0)


def test_growth_slope_needs_three_points():
    assert memory.growth_slope([0, 10, 20, 30], [1, 2, 3, 4]) is None  # second half: 2 points
    assert memory.growth_slope([0, 10, 20, 30, 40, 50], [1, 2, 3, 4, 5, 6]) == pytest.approx(6.0)


@pytest.mark.parametrize("slope, ok", [(0.0, True), (0.5, True), (5.0, False), (-3.0, True)])
def test_rss_verdict_flat_vs_growing(slope, ok):
    recorder = memory.RssRecorder(pid=0)
    times, values = _series(20, 10, slope, noise_mb=3.0)
    _, triton = _series(20, 10, 0.0, noise_mb=3.0, start=900.0)
    for t, gateway, tri in zip(times, values, triton):
        recorder.rows.append({"elapsed_s": t, **dict.fromkeys(memory.ROLES, 0.0), "gateway": gateway, "triton": tri,
                              "total": gateway + tri, "processes": 3})
    verdict = recorder.verdict(memory.MAX_GROWTH_MB_PER_MIN)
    assert verdict["ok"] is ok
    assert verdict["growing"] == ([] if ok else ["gateway", "total"])
    assert set(verdict["slope_mb_per_min"]) == {"gateway", "triton", "total"}  # roles with no memory are left out
    assert verdict["slope_mb_per_min"]["gateway"] == pytest.approx(slope, abs=0.5)
    assert verdict["judged"] and verdict["second_half_s"] == 600


def test_rss_verdict_does_not_judge_a_short_run():
    recorder = memory.RssRecorder(pid=0)
    times, values = _series(1, 5, 10.0)  # a 60 s run: the second half spans 30 s
    for t, value in zip(times, values):
        recorder.rows.append({"elapsed_s": t, **dict.fromkeys(memory.ROLES, 0.0), "gateway": value, "total": value,
                              "processes": 1})
    verdict = recorder.verdict(memory.MAX_GROWTH_MB_PER_MIN)
    assert verdict["slope_mb_per_min"]["gateway"] == pytest.approx(10.0)
    assert (verdict["judged"], verdict["ok"], verdict["growing"]) == (False, True, [])


def test_rss_csv_columns(tmp_path):
    recorder = memory.RssRecorder(pid=0)
    recorder.rows.append({"elapsed_s": 0.0, **dict.fromkeys(memory.ROLES, 1.0), "total": 5.0, "processes": 5})
    recorder.write(tmp_path / "rss.csv")
    assert (tmp_path / "rss.csv").read_text().splitlines() == [
        "elapsed_s,supervisor_mb,gateway_mb,grpc_mb,triton_mb,other_mb,total_mb,processes",
        "0.0,1.0,1.0,1.0,1.0,1.0,5.0,5"]


@pytest.mark.parametrize("cmdline, role", [
    (["/v/bin/python", "-m", "braintumor.serving.cli", "serve", "--model-repository", "/m/triton_repo"], "supervisor"),
    (["/v/bin/braintumor", "serve"], "supervisor"),
    (["/v/bin/python", "-m", "bentoml", "serve", "braintumor.serving.service:BrainTumorGateway"], "gateway"),
    (["/v/bin/python", "-m", "_bentoml_impl.worker.service", "--worker-id", "1"], "gateway"),
    (["/v/bin/python", "-m", "braintumor.serving.cli", "grpc-server", "--port", "50051"], "grpc"),
    (["/site/pytriton/tritonserver/bin/tritonserver", "--model-repository", "/r"], "triton"),
    (["/tmp/backends/python/triton_python_backend_stub", "/r/brain_tumor/1/model.py"], "triton"),
    (["/bin/sh", "-c", "sleep 1"], "other"),
])
def test_role_of(cmdline, role):
    assert memory.role_of(cmdline) == role


@pytest.mark.parametrize("url, port", [("http://127.0.0.1:3000", 3000), ("localhost:50051", 50051),
                                       ("http://h:8080/", 8080), ("http://h", 80), ("https://h/x", 443)])
def test_port_of(url, port):
    assert memory.port_of(url) == port


def test_sample_rss_of_this_process():
    pytest.importorskip("psutil")

    sample = memory.sample_rss(os.getpid())
    assert sample["processes"] >= 1 and sample["total"] > 1.0


@pytest.mark.parametrize("target", ["http", "grpc"])
def test_check_ready_refuses_a_server_that_is_down(target):
    pytest.importorskip("grpc_health")
    from braintumor.serving.triton_embedded import free_port

    url = f"http://127.0.0.1:{free_port()}" if target == "http" else f"127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=f"the {target} front door at .* is not ready"):
        runner.check_ready(target, url)


# -- shapes ---------------------------------------------------------------------------------------------------

def _ticks(shape, until: float, every: float = 5.0):
    return [shape.at(k * every) for k in range(int(until / every) + 1)]


def test_step_shape_sequence(shapes):
    shape = shapes.StepShape(users=8, spawn_rate=2.0, duration=40, steps=4)
    assert _ticks(shape, 40) == [(2, 2.0), (2, 2.0), (4, 2.0), (4, 2.0), (6, 2.0), (6, 2.0), (8, 2.0), (8, 2.0),
                                 None]


def test_step_shape_rounds_up_and_caps_steps(shapes):
    assert [u for u, _ in _ticks(shapes.StepShape(10, 1.0, 30, steps=3), 25)] == [4, 4, 7, 7, 10, 10]
    assert [u for u, _ in _ticks(shapes.StepShape(2, 1.0, 40, steps=4), 35)] == [1, 1, 1, 1, 2, 2, 2, 2]


def test_soak_shape_holds_then_stops(shapes):
    assert _ticks(shapes.SoakShape(4, 2.0, 20), 25) == [(4, 2.0)] * 4 + [None, None]


def test_make_shape(shapes, monkeypatch):
    monkeypatch.setenv(shapes.STEPS_ENV, "2")
    assert shapes.make_shape("step", 4, 1.0, 60) == shapes.StepShape(4, 1.0, 60, 2)
    with pytest.raises(ValueError, match="step, soak"):
        shapes.make_shape("ramp", 4, 1.0, 60)
    with pytest.raises(ValueError, match="--run-time"):
        shapes.make_shape("step", 4, 1.0, None)


# -- payloads -------------------------------------------------------------------------------------------------

def _jpeg(value: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((24, 20), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_payloads_read_once_and_spread(payloads, tmp_path):
    for k in range(10):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        (tmp_path / f"c{k % 2}" / f"s{k:02d}.jpg").write_bytes(_jpeg(k * 20))
    (tmp_path / "notes.txt").write_text("not an image")
    picked = payloads.pick_files(tmp_path, 4)
    assert [p.parent.name for p in picked] == ["c0", "c0", "c1", "c1"]
    loaded = payloads.load_payloads(str(tmp_path), 3)
    assert len(loaded) == 3 and payloads.load_payloads(str(tmp_path), 3) is loaded  # cached per process


def test_payloads_clear_errors(payloads, tmp_path, monkeypatch):
    monkeypatch.setenv(payloads.IMAGES_ENV, str(tmp_path / "missing"))
    with pytest.raises(payloads.PayloadError, match="BRAINTUMOR_LOADTEST_IMAGES"):
        payloads.image_folder()
    with pytest.raises(payloads.PayloadError, match="no .jpg"):
        payloads.pick_files(tmp_path, 4)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_unique_bytes_keep_the_pixels(payloads, fmt):
    import numpy as np
    from PIL import Image

    pixels = np.arange(24 * 20, dtype=np.uint8).reshape(24, 20)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    payload = payloads.Payload("x", buf.getvalue(), "image/png")
    rng = random.Random(1)
    first, second = payloads.unique_bytes(payload, rng), payloads.unique_bytes(payload, rng)
    assert len({first, second, payload.data}) == 3
    for data in (first, second):
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # PNG: a bad chunk CRC raises here
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(payload.data))))


def test_multipart_body_parses(payloads):
    from email.parser import BytesParser
    from email.policy import HTTP

    payload = payloads.Payload("brisc_gl_ax.jpg", b"\xff\xd8data", "image/jpeg")
    body, content_type = payloads.multipart({"method": "lime", "num_samples": "20"}, payload)
    message = BytesParser(policy=HTTP).parsebytes(f"content-type: {content_type}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert parts["method"].get_content() == "lime" and parts["num_samples"].get_content() == "20"
    assert parts["image"].get_payload(decode=True) == b"\xff\xd8data"
    assert parts["image"].get_filename() == "slice.jpg"  # BRISC names carry the class: never sent


# -- locustfile lookup ----------------------------------------------------------------------------------------

def test_find_locustfile(tmp_path):
    assert runner.find_locustfile("http") == LOADTEST / "locustfile_http.py"
    assert runner.find_locustfile("grpc") == LOADTEST / "locustfile_grpc.py"
    own = tmp_path / "mine.py"
    own.write_text("")
    assert runner.find_locustfile("http", own) == own
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runner.find_locustfile("http", tmp_path / "absent.py")


def test_locustfiles_import_cleanly(tmp_path):
    """Both locustfiles load under locust (gevent patched, grpc made gevent-safe) and define one user each."""
    if importlib.util.find_spec("locust") is None:  # not importorskip: importing locust gevent-patches this process
        pytest.skip("pip install -e '.[loadtest]'")
    import subprocess

    (tmp_path / "a.jpg").write_bytes(_jpeg(100))
    code = ("from locust.util.load_locustfile import load_locustfile; import sys\n"
            "for f in sys.argv[1:]:\n"
            "    users, shapes = load_locustfile(f)\n"
            "    print(sorted(users), [type(s).__name__ for s in shapes])\n")
    env = {**os.environ, "BRAINTUMOR_LOADTEST_IMAGES": str(tmp_path), "BRAINTUMOR_LOADTEST_SHAPE": "step"}
    out = subprocess.run([sys.executable, "-c", "import locust\n" + code, str(LOADTEST / "locustfile_http.py"),
                          str(LOADTEST / "locustfile_grpc.py")], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['GatewayUser'] ['StepShape']", "['GrpcApiUser'] ['StepShape']"]


# -- running locust under a hard timeout ----------------------------------------------------------------------

def test_run_group_kills_a_hung_group(tmp_path):
    """A run that ignores SIGTERM (as locust does with a gRPC channel left open) is killed with its children."""
    import time

    hang = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    ticks = []
    start = time.monotonic()
    code, timed_out = runner.run_group([sys.executable, "-c", hang], dict(os.environ), 2.0, tmp_path / "log",
                                   on_tick=lambda: ticks.append(1), tick_s=0.5)
    assert timed_out and code == -9
    assert time.monotonic() - start < 15
    assert 3 <= len(ticks) <= 6
    child = Path(f"/proc/{(tmp_path / 'log').read_text().split()[0]}/stat")
    time.sleep(0.2)
    assert not child.exists() or child.read_text().split(") ")[1][0] == "Z"  # gone, or a zombie awaiting its reaper


def test_run_group_returns_the_exit_code(tmp_path):
    code, timed_out = runner.run_group([sys.executable, "-c", "print('hi'); raise SystemExit(3)"], dict(os.environ), 30,
                                   tmp_path / "log")
    assert (code, timed_out) == (3, False)
    assert (tmp_path / "log").read_text() == "hi\n"


@pytest.mark.parametrize("target, variable, flag, value, inherited", [
    # explanations are on demand: the heatmap only with --heatmap
    ("http", "BRAINTUMOR_LOADTEST_HEATMAP", [], "0", "1"),
    ("http", "BRAINTUMOR_LOADTEST_HEATMAP", ["--heatmap"], "1", "0"),
    # the mask as COCO RLE only with --mask-format rle
    ("grpc", "BRAINTUMOR_LOADTEST_MASK_FORMAT", [], "png", "rle"),
    ("grpc", "BRAINTUMOR_LOADTEST_MASK_FORMAT", ["--mask-format", "rle"], "rle", "png"),
])
def test_request_flags_reach_the_locustfiles(target, variable, flag, value, inherited, monkeypatch, tmp_path):
    """What analyze asks for comes from the flag alone: a value inherited from the environment is ignored."""
    monkeypatch.setenv(variable, inherited)
    args = _loadtest_args(target, "--out", "unused", "--images", str(tmp_path), *flag)
    assert _loadtest_commands()._child_env(args, "flat", 8, None)[variable] == value


def _loadtest_commands():
    from braintumor.loadtest import commands

    return commands


def _loadtest_args(target: str, *flags: str):
    import argparse

    parser = argparse.ArgumentParser()
    _loadtest_commands().register(parser.add_subparsers())
    return parser.parse_args(["loadtest", "--target", target, *flags])


def test_the_api_key_comes_from_a_named_environment_variable_never_the_command_line(monkeypatch, tmp_path):
    commands = _loadtest_commands()
    monkeypatch.setenv("BRAINTUMOR_API_KEY", "from-default")
    monkeypatch.setenv("MY_KEY", "from-mine")
    base = ("--out", "unused", "--images", str(tmp_path))
    assert commands._child_env(_loadtest_args("http", *base), "flat", 1, None)["BRAINTUMOR_API_KEY"] == "from-default"
    env = commands._child_env(_loadtest_args("http", *base, "--api-key-env", "MY_KEY"), "flat", 1, None)
    assert env["BRAINTUMOR_API_KEY"] == "from-mine"  # what the locustfiles read
    with pytest.raises(ValueError, match="--api-key-env NOT_SET"):
        commands._child_env(_loadtest_args("http", *base, "--api-key-env", "NOT_SET"), "flat", 1, None)
    with pytest.raises(SystemExit):  # the old flag is gone: a key on the command line is visible in ps
        _loadtest_args("http", *base, "--api-key", "secret")


def test_loadtest_needs_an_images_folder(monkeypatch):
    monkeypatch.delenv("BRAINTUMOR_LOADTEST_IMAGES", raising=False)
    with pytest.raises(ValueError, match="--images DIR is needed"):
        _loadtest_commands()._child_env(_loadtest_args("http", "--out", "unused"), "flat", 1, None)


def test_an_unknown_mask_format_is_refused_by_loadtest():
    import argparse

    from braintumor.loadtest import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["loadtest", "--target", "grpc", "--out", "unused", "--mask-format", "jpeg"])


def test_bench_gateway_cpu_per_image_by_role():
    """CPU ms per image: each role's CPU seconds between two reads over the images answered; a process that appeared
    in between counts from zero; roles outside the serving ones (supervisor, other) are left out."""
    from braintumor.loadtest.bench_cpu import CpuMeter

    before = {1: ("gateway", 10.0), 2: ("triton", 4.0), 3: ("supervisor", 1.0)}
    after = {1: ("gateway", 10.5), 2: ("triton", 5.0), 3: ("supervisor", 9.0), 4: ("triton", 0.25)}
    assert CpuMeter.per_image_ms(before, after, 100) == {"gateway": 5.0, "grpc": 0.0, "triton": 12.5, "nginx": 0.0}


def test_bench_gateway_counts_nginx_as_one_role_beside_serve():
    """--nginx: nginx's tree (master and workers) is read as the role nginx and merged with serve's by-role reads."""
    pytest.importorskip("psutil")
    import subprocess

    from braintumor.loadtest.bench_cpu import CpuMeter, Meters, RoleMeter

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        nginx = RoleMeter(child.pid, "nginx")
        assert [role for role, _ in nginx.read().values()] == ["nginx"]
        merged = Meters(CpuMeter(None), nginx).read()
        assert list(merged) == [child.pid] and merged[child.pid][0] == "nginx"
        assert RoleMeter(None, "nginx").read() == {}
    finally:
        child.kill()
        child.wait()


def test_bench_gateway_counts_the_load_generators_own_cpu():
    """The load generator shares the host with the servers: its CPU per image is measured with the cell."""
    from braintumor.loadtest.bench_cpu import CpuMeter, measured

    def run():
        t = time.process_time()
        while time.process_time() - t < 0.2:
            pass
        return {"n": 10}

    result, cpu = measured(CpuMeter(None), run)
    assert result == {"n": 10}
    assert 15.0 <= cpu["client"] <= 200.0 and cpu["gateway"] == 0.0


def test_bench_gateway_cpu_meter_reads_a_real_process_tree():
    pytest.importorskip("psutil")
    import subprocess

    from braintumor.loadtest.bench_cpu import CpuMeter

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        meter = CpuMeter(os.getpid())
        deadline = time.monotonic() + 20
        while meter.read().get(child.pid, ("", 0.0))[1] < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        role, seconds = meter.read()[child.pid]
        assert role == "other" and seconds >= 0.25  # its busy loop, seen through psutil's cpu_times
        assert CpuMeter(None).read() == {}
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("backend, http_cpu, grpc_cpu, overhead", [
    # Triton runs the model: front door + Triton - model alone
    ("triton", {"gateway": 12.0, "grpc": 0.1, "triton": 46.0, "client": 4.4},
     {"gateway": 0.1, "grpc": 9.0, "triton": 46.5, "client": 0.8}, "15.0 / 12.5"),
    # the front door runs the model (no Triton process): its CPU includes the model's
    ("onnxruntime", {"gateway": 54.0, "grpc": 0.1, "triton": 0.0, "client": 4.4},
     {"gateway": 0.1, "grpc": 51.5, "triton": 0.0, "client": 0.8}, "11.0 / 8.5"),
])
def test_bench_gateway_report_prints_the_stacks_cpu_over_the_model(backend, http_cpu, grpc_cpu, overhead):
    """The column that compares backends fairly: the serving stack's CPU per image beyond the model alone's, measured
    in the same run; the backend is named in the header."""
    import argparse

    from braintumor.loadtest.bench_report import report

    args = argparse.Namespace(seconds=15.0, rounds=1, heatmap=False, layout="latency", gateway=None, backend=backend,
                              mask_format="png")
    cell = {"rps": 30.0, "p50": 30.0, "p99": 40.0, "failures": 0}
    rows = [{"c": 8, "model": {"rps": 43.0, "batch": 8, "p50": 180.0, "p99": 200.0, "cpu_ms": 43.0},
             "http": cell, "http_cpu": http_cpu, "grpc": cell, "grpc_cpu": grpc_cpu, "base": None, "base_cpu": None}]
    text = report(rows, args, "brain_tumor/3", 64)
    assert f"backend {backend}" in text.splitlines()[0]
    cpu_row = text.splitlines()[-1].split("|")
    assert cpu_row[7].strip() == "43.0" and cpu_row[10].strip() == overhead


def test_bench_gateway_pools_the_rounds_of_a_cell():
    """A cell made of alternating rounds: latencies pooled (the median of all, not of the rounds' medians), images over
    the summed load time, failures added, the model line's CPU per image weighted by images; a round that answered
    nothing weighs nothing in the CPU columns."""
    from braintumor.loadtest.bench_load import _summary, combine, combine_cpu

    one = _summary([0.010, 0.020, 0.030], 3, 1.0, 1) | {"batch": 1, "cpu_ms": 40.0}
    two = _summary([0.040, 0.050, 0.060, 0.070, 0.080, 0.090], 6, 2.0, 0) | {"batch": 1, "cpu_ms": 46.0}
    cell = combine([one, two])
    assert cell["rps"] == pytest.approx(3.0) and cell["n"] == 9 and cell["failures"] == 1
    assert cell["p50"] == pytest.approx(50.0)  # the pooled median; the rounds' medians would give 20 and 65
    assert cell["batch"] == 1 and cell["cpu_ms"] == pytest.approx(44.0)
    empty = _summary([], 0, 1.0, 2)
    cpu = combine_cpu([(one, {"gateway": 9.0, "triton": 45.0}), (two, {"gateway": 12.0, "triton": 42.0}),
                       (empty, {"gateway": float("nan"), "triton": float("nan")})])
    assert cpu == {"gateway": pytest.approx(11.0), "triton": pytest.approx(43.0)}


def test_bench_gateway_report_prints_the_p50_gap_to_the_model():
    """The p50 goal's measure, printed: each door's median minus the model alone's, and the rounds in the header."""
    import argparse

    from braintumor.loadtest.bench_report import report

    args = argparse.Namespace(seconds=15.0, rounds=3, heatmap=False, layout="latency", gateway=None,
                              backend="triton", mask_format="png")
    model = {"rps": 41.0, "batch": 1, "p50": 24.0, "p99": 28.0, "cpu_ms": 43.0}
    http = {"rps": 28.0, "p50": 33.4, "p99": 40.0, "failures": 0}
    grpc = {"rps": 30.0, "p50": 30.6, "p99": 38.0, "failures": 0}
    rows = [{"c": 1, "model": model, "http": http, "http_cpu": None, "grpc": grpc, "grpc_cpu": None, "base": None,
             "base_cpu": None}]
    text = report(rows, args, "brain_tumor/3", 64)
    assert "15 s per cell in 3 alternating rounds" in text.splitlines()[0]
    assert text.splitlines()[-1].split("|")[6].strip() == "+9 / +7"


def test_bench_gateway_http_load_sends_what_the_gateway_parses():
    """The lean HTTP load generator (aiohttp, bodies built once): each body is multipart as the gateway's parser reads
    it, with the image and the asked fields; 200s are timed, anything else counted as a failure."""
    aiohttp_web = pytest.importorskip("aiohttp.web")
    import asyncio

    from braintumor.loadtest.bench_load import load_http
    from braintumor.serving.multipart import boundary_of, read_parts

    seen: list[dict[str, bytes]] = []

    async def analyze(request):
        parts = read_parts(boundary_of(request.headers["content-type"]), await request.read())
        seen.append({part.name: bytes(part.data) for part in parts})
        return aiohttp_web.json_response({}, status=200 if len(seen) % 4 else 503)

    async def main():
        from aiohttp.test_utils import TestServer

        app = aiohttp_web.Application()
        app.router.add_post("/analyze", analyze)
        async with TestServer(app, host="127.0.0.1") as server:
            return await load_http(str(server.make_url("/analyze")), [b"\xff\xd8one", b"\xff\xd8two"], 2, 0.5,
                                   False, "rle")

    result = asyncio.run(main())
    assert len(seen) >= 8 and result["n"] + result["failures"] == len(seen) - 1  # the first is the warm-up
    assert result["failures"] == sum(1 for k in range(2, len(seen) + 1) if k % 4 == 0)
    assert {part["image"] for part in seen} == {b"\xff\xd8one", b"\xff\xd8two"}
    assert all(part["heatmap"] == b"false" and part["mask_format"] == b"rle" for part in seen)


def test_bench_flood_table_shows_each_process_and_what_it_kept():
    from braintumor.loadtest.bench_flood import table

    names = {11: "gateway: python", 12: "triton: stub brain_tumor"}
    moments = {"idle": {11: 300.0, 12: 140.0}, "flood end": {11: 500.0, 12: 180.0}, "+30 s idle": {11: 520.0}}
    lines = table(names, moments).splitlines()
    gateway = next(line for line in lines if line.startswith("gateway"))
    stub = next(line for line in lines if line.startswith("triton"))
    assert gateway.split()[-4:] == ["300", "500", "520", "+220"]
    assert stub.split()[-4:] == ["140", "180", "-", "+nan"]  # the stub was gone at the last sample: no kept figure
    assert lines[-1].split()[-4:] == ["440", "680", "520", "+80"]


def test_bench_gateway_report_prints_the_triton_direct_floor():
    """The Triton-direct line gets its own table: its ratio to the model alone, each door's ratio to it, its CPU over the
    model's, and each door's own CPU with nginx's added when nginx is in front."""
    import argparse

    from braintumor.loadtest.bench_report import report

    args = argparse.Namespace(seconds=15.0, rounds=3, heatmap=False, layout="latency", gateway=None,
                              backend="triton", mask_format="png", nginx=True, bento_io=False)
    model = {"rps": 100.0, "batch": 8, "p50": 70.0, "p99": 90.0, "cpu_ms": 15.5}
    triton = {"rps": 84.0, "p50": 84.0, "p99": 100.0, "failures": 0}
    door = {"rps": 63.0, "p50": 110.0, "p99": 200.0, "failures": 0}
    rows = [{"c": 8, "model": model, "triton": triton,
             "triton_cpu": {"gateway": 0.0, "grpc": 0.0, "triton": 17.6, "nginx": 0.0, "client": 0.9},
             "http": door, "http_cpu": {"gateway": 7.3, "grpc": 0.0, "triton": 17.6, "nginx": 0.5, "client": 0.6},
             "grpc": door, "grpc_cpu": {"gateway": 0.0, "grpc": 5.9, "triton": 17.6, "nginx": 0.4, "client": 0.6},
             "base": None, "base_cpu": None}]
    text = report(rows, args, "brain_tumor/3", 64)
    assert "through nginx" in text.splitlines()[0]
    cells = [c.strip() for c in text.splitlines()[-1].split("|")]
    assert cells[1:11] == ["8", "84.0", "0.84x", "0.75x", "0.75x", "+14", "17.6", "2.1", "0.9", "7.8 / 6.3"]
    # the stack over the model counts nginx: 7.3 + 17.6 + 0.5 - 15.5 (HTTP), 5.9 + 17.6 + 0.4 - 15.5 (gRPC)
    assert "| 9.9 / 8.4 |" in text
    rows[0]["triton"] = None
    assert "Triton direct" not in report(rows, args, "brain_tumor/3", 64)


def test_bench_nginx_points_the_deploy_conf_at_the_gateway(tmp_path):
    """The bench's nginx runs the deploy's own server block, its upstream and listen rewritten (the proxy test uses the
    same helper), and a grpc_pass server in front of the gRPC door."""
    from braintumor.loadtest.bench_nginx import DEPLOY_CONF, GRPC_SERVER, deploy_server, write_config

    text = deploy_server("127.0.0.1:3000", 8123)
    assert "server 127.0.0.1:3000;" in text and "listen 127.0.0.1:8123;" in text
    assert "server gateway:3000;" not in text and text.count("\n") == DEPLOY_CONF.read_text().count("\n")
    conf = write_config(tmp_path / "nginx", text + GRPC_SERVER.format(port=8124, upstream="127.0.0.1:3001"))
    written = conf.read_text()
    assert "daemon off;" in written and f"include {tmp_path / 'nginx' / 'servers.conf'};" in written
    servers = (tmp_path / "nginx" / "servers.conf").read_text()
    assert "listen 127.0.0.1:8124 http2;" in servers and "grpc_pass grpc://127.0.0.1:3001;" in servers
