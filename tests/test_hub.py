"""Published weights by name (allmlp.weights.hub): a real HTTP server on 127.0.0.1 stands in for every host."""

import hashlib
import io
import multiprocessing
import os
import re
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import allmlp
from allmlp.cli import main as cli
from allmlp.models.registry import REGISTRY, WeightRelease, get_release
from allmlp.weights import hub
from allmlp.weights.hub import DownloadError, cache_dir, fetch_release, release_url

TINY_MIXER = dict(img_size=64, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32)  # patch 32: 4 tokens
TINY_CYCLEMLP = dict(layers=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16], mlp_ratios=[2, 2, 2, 2], img_size=32)
TINY_VIP = dict(
    layers=[1, 1, 1, 1],
    patch_size=4,
    embed_dims=[16, 32, 32, 32],
    transitions=[True, False, False, False],
    segment_dim=[8, 4, 4, 4],
    mlp_ratios=[3, 3, 3, 3],
    img_size=32,
)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up (a test's timeout, a dropped download) is expected here: no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Server:
    """Serves `root` over HTTP with Range support, logs every request, and misbehaves on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.bytes_sent = 0
        self.ranges = True
        self.cut_once: dict[str, int] = {}  # path -> body bytes sent before the connection drops (next request)
        self.cut_always: dict[str, int] = {}
        self.before_response = None  # called with the request path before anything is sent
        self.released = threading.Event()  # lets handlers that wait finish when the test ends
        self.http = _QuietServer(("127.0.0.1", 0), _Handler)
        self.http.daemon_threads = True
        self.http.state = self
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def put(self, file_name: str, data: bytes) -> None:
        path = self.root / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        state: Server = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        if state.before_response is not None:
            state.before_response(self.path)
        file = state.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if self.headers.get("Range") and state.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = state.cut_once.pop(self.path, state.cut_always.get(self.path))
        body = body if cut is None else body[:cut]
        state.bytes_sent += len(body)  # before writing: the client may be done before this thread runs again
        self.wfile.write(body)  # HTTP/1.0: the connection closes after this, early if the body was cut

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    state = Server(tmp_path / "mirror")
    thread = threading.Thread(target=state.http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("ALLMLP_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ALLMLP_WEIGHTS_URL", state.url)
    monkeypatch.delenv("ALLMLP_OFFLINE", raising=False)
    yield state
    state.released.set()
    state.http.shutdown()
    state.http.server_close()


def official_npz(config: dict, num_classes: int = 1000, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """A Mixer in the official .npz layout (Flax names, HWIO stem, (in, out) kernels) for a small config."""
    c, s = config["hidden_dim"], (config["img_size"] // 32) ** 2
    shapes = {"stem/kernel": (32, 32, 3, c), "stem/bias": (c,)}
    for i in range(config["num_blocks"]):
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            shapes |= {f"MixerBlock_{i}/{norm}/scale": (c,), f"MixerBlock_{i}/{norm}/bias": (c,)}
        for mlp, width, hidden in (
            ("token_mixing", s, config["tokens_mlp_dim"]),
            ("channel_mixing", c, config["channels_mlp_dim"]),
        ):
            shapes |= {
                f"MixerBlock_{i}/{mlp}/Dense_0/kernel": (width, hidden),
                f"MixerBlock_{i}/{mlp}/Dense_0/bias": (hidden,),
                f"MixerBlock_{i}/{mlp}/Dense_1/kernel": (hidden, width),
                f"MixerBlock_{i}/{mlp}/Dense_1/bias": (width,),
            }
    shapes |= {"pre_head_layer_norm/scale": (c,), "pre_head_layer_norm/bias": (c,)}
    shapes |= {"head/kernel": (c, num_classes), "head/bias": (num_classes,)}
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), arrays


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def safetensors_bytes(state_dict: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "written.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path.read_bytes()


def custom_release(server: Server, data: bytes, **fields) -> WeightRelease:
    """A release served at /custom/w.npz whose expected size / sha256 the test chooses."""
    server.put("custom/w.npz", data)
    return WeightRelease(
        "t", "test", 1000, "test", url=f"{server.url}/custom/w.npz", file_name="custom/w.npz", **fields
    )


def test_pretrained_true_downloads_the_default_release_once_and_loads_it(server, capsys):
    data, arrays = official_npz(TINY_MIXER)
    server.put("mixer_models/gsam/Mixer-S_32.npz", data)
    model = allmlp.create_model("mixer_s32_224", pretrained=True, **TINY_MIXER)
    stem = torch.from_numpy(arrays["stem/kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(model.stem.proj.weight, stem)
    assert server.requests == [("/mixer_models/gsam/Mixer-S_32.npz", None)]
    cached = cache_dir() / "mixer_models/gsam/Mixer-S_32.npz"
    assert cached.read_bytes() == data
    assert not cached.with_name("Mixer-S_32.npz.part").exists()
    assert "Mixer-S_32.npz" in capsys.readouterr().err  # the progress bar
    again = allmlp.create_model("mixer_s32_224", pretrained="gsam", **TINY_MIXER)
    assert torch.equal(again.stem.proj.weight, stem)
    assert len(server.requests) == 1  # the second model came from the cache


def test_pretrained_tag_gives_the_release_head_and_each_host_format_loads(server, tmp_path):
    data, arrays = official_npz(TINY_MIXER, num_classes=21843)
    server.put("mixer_models/imagenet21k/Mixer-B_16.npz", data)
    in21k = allmlp.create_model("mixer_b16_224", pretrained="imagenet21k", **dict(TINY_MIXER, patch_size=32))
    assert in21k.num_classes == 21843
    assert torch.equal(in21k.head.weight, torch.from_numpy(arrays["head/kernel"].T))

    timm_copy = allmlp.create_model("mixer_b16_224", **dict(TINY_MIXER, patch_size=32))
    server.put(
        get_release("mixer_b16_224", "timm:goog_in21k_ft_in1k").file_name,
        safetensors_bytes(timm_copy.state_dict(), tmp_path),
    )
    loaded = allmlp.create_model(
        "mixer_b16_224", pretrained="timm:goog_in21k_ft_in1k", **dict(TINY_MIXER, patch_size=32)
    )
    assert torch.equal(loaded.blocks[1].mlp_channels.fc2.weight, timm_copy.blocks[1].mlp_channels.fc2.weight)

    torch.manual_seed(0)
    authors = allmlp.create_model("cyclemlp_b1", **TINY_CYCLEMLP)
    server.put(get_release("cyclemlp_b1").file_name, torch_bytes({"model": authors.state_dict(), "epoch": 299}))
    cycle = allmlp.create_model("cyclemlp_b1", pretrained=True, num_classes=10, **TINY_CYCLEMLP)
    assert cycle.num_classes == 10  # num_classes wins over the release's: a fresh zero head for fine-tuning
    assert torch.equal(cycle.patch_embed.proj.weight, authors.patch_embed.proj.weight)
    assert not cycle.head.weight.any()
    assert [path for path, _ in server.requests] == [
        "/mixer_models/imagenet21k/Mixer-B_16.npz",
        "/timm/mixer_b16_224.goog_in21k_ft_in1k/resolve/main/model.safetensors",
        "/ShoufaChen/CycleMLP/releases/download/v0.1/CycleMLP_B1.pth",
    ]


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_a_mismatch_keeps_nothing_and_names_url_expected_and_received(server, wrong):
    data, _ = official_npz(TINY_MIXER)
    expected, said, received = {
        "size": (len(data) + 1, f"expected {len(data) + 1} bytes", f"received {len(data)}"),
        "sha256": ("0" * 64, f"expected sha256 {'0' * 64}", f"received {hashlib.sha256(data).hexdigest()}"),
    }[wrong]
    release = custom_release(server, data, **{wrong: expected})
    with pytest.raises(DownloadError) as err:
        fetch_release(release, "test.t", progress=False)
    message = str(err.value)
    assert f"{server.url}/custom/w.npz" in message
    assert f"{said}, {received}" in message
    assert "nothing was kept" in message
    assert sorted(p.name for p in (cache_dir() / "custom").iterdir()) == ["w.npz.lock"]


def test_the_right_size_and_sha256_are_accepted(server):
    data, _ = official_npz(TINY_MIXER)
    release = custom_release(server, data, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert fetch_release(release, "test.t", progress=False).read_bytes() == data


def test_a_dropped_connection_resumes_with_a_range_request(server):
    data, _ = official_npz(TINY_MIXER)
    release = custom_release(server, data, sha256=hashlib.sha256(data).hexdigest())
    server.cut_once["/custom/w.npz"] = len(data) // 2
    assert fetch_release(release, "test.t", progress=False).read_bytes() == data
    assert server.requests == [("/custom/w.npz", None), ("/custom/w.npz", f"bytes={len(data) // 2}-")]
    assert server.bytes_sent == len(data)  # nothing was sent twice


def test_a_truncated_body_fails_keeps_the_part_and_the_next_call_resumes(server):
    data, _ = official_npz(TINY_MIXER)
    release = custom_release(server, data)
    server.cut_always["/custom/w.npz"] = 1000
    with pytest.raises(DownloadError, match=rf"closed after 3000 of {len(data)} bytes; 3 attempts"):
        fetch_release(release, "test.t", progress=False)
    assert not (cache_dir() / "custom/w.npz").exists()
    server.cut_always.clear()
    assert fetch_release(release, "test.t", progress=False).read_bytes() == data
    assert server.requests[-1] == ("/custom/w.npz", "bytes=3000-")


@pytest.mark.parametrize("case", ["no range support", "longer part", "complete part"])
def test_a_part_left_by_an_earlier_run_is_finished_or_restarted_cleanly(server, case):
    data, _ = official_npz(TINY_MIXER)
    release = custom_release(server, data)
    part = cache_dir() / "custom/w.npz.part"
    part.parent.mkdir(parents=True)
    server.ranges = case != "no range support"
    part.write_bytes({"no range support": b"junk", "longer part": data + b"junk", "complete part": data}[case])
    assert fetch_release(release, "test.t", progress=False).read_bytes() == data
    assert not part.exists()
    # A complete part needs no data: the server's 416 says how long the file is (killed before the rename).
    assert server.bytes_sent == (0 if case == "complete part" else len(data))


def test_a_server_that_stalls_times_out_with_the_url(server):
    server.before_response = lambda path: server.released.wait(30)
    release = custom_release(server, official_npz(TINY_MIXER)[0])
    with pytest.raises(DownloadError, match=re.escape(f"cannot download {server.url}/custom/w.npz (timed out")):
        fetch_release(release, "test.t", timeout=0.2, progress=False)
    assert len(server.requests) == hub.ATTEMPTS


def test_not_found_and_no_network_name_url_cache_path_and_the_manual_way(server, monkeypatch):
    with pytest.raises(DownloadError) as err:
        allmlp.create_model("mixer_b32_224", pretrained="sam")
    expected_path = cache_dir() / "mixer_models/sam/Mixer-B_32.npz"
    assert f"cannot download {server.url}/mixer_models/sam/Mixer-B_32.npz: HTTP 404" in str(err.value)
    assert f"Place the file by hand at {expected_path}" in str(err.value)
    assert "weights=PATH" in str(err.value)

    unused = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    closed_port = unused.server_address[1]
    unused.server_close()  # nothing listens there now: connection refused, as without a network
    monkeypatch.setenv("ALLMLP_WEIGHTS_URL", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(
        DownloadError, match=r"cannot download http://127\.0\.0\.1:\d+/mixer_models/sam/Mixer-B_32\.npz"
    ):
        allmlp.create_model("mixer_b32_224", pretrained="sam")


def _child_fetch(name: str) -> None:
    path = fetch_release(get_release(name), name, progress=False)
    os._exit(0 if path.is_file() else 1)


def _blocked_flock_waiters(lock: Path) -> int:
    """Processes waiting for a flock on `lock` (Linux lists them in /proc/locks as '-> FLOCK ...')."""
    if not lock.exists():
        return 0
    inode = os.stat(lock).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[6].endswith(f":{inode}"))


def test_two_processes_at_once_download_once(server):
    data, _ = official_npz(TINY_MIXER)
    server.put("mixer_models/gsam/Mixer-S_32.npz", data)
    lock = cache_dir() / "mixer_models/gsam/Mixer-S_32.npz.lock"

    def hold_until_the_other_waits(path):
        # Answer the first request only once the second process waits for the lock (or has sent its own
        # request, which the assertion below then catches). The loop is bounded; the usual exit is immediate.
        for _ in range(600):
            if _blocked_flock_waiters(lock) or len(server.requests) > 1:
                return
            time.sleep(0.05)

    server.before_response = hold_until_the_other_waits
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_child_fetch, args=("mixer_s32_224",)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(server.requests) == 1
    assert (cache_dir() / "mixer_models/gsam/Mixer-S_32.npz").read_bytes() == data


def test_offline_mode_never_touches_the_network_and_names_the_cache_path(server, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("ALLMLP_OFFLINE=1 reached the network")

    monkeypatch.setenv("ALLMLP_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data, _ = official_npz(TINY_MIXER)
    server.put("mixer_models/gsam/Mixer-S_32.npz", data)
    cached = cache_dir() / "mixer_models/gsam/Mixer-S_32.npz"
    with pytest.raises(DownloadError, match=f"ALLMLP_OFFLINE is set .* looked for {re.escape(str(cached))}"):
        allmlp.create_model("mixer_s32_224", pretrained=True, **TINY_MIXER)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    assert allmlp.create_model("mixer_s32_224", pretrained=True, **TINY_MIXER).num_classes == 1000
    assert server.requests == []


def test_the_mirror_replaces_the_host_from_the_variable_or_the_option(server, monkeypatch, capsys):
    release = get_release("mixer_b16_224")
    monkeypatch.delenv("ALLMLP_WEIGHTS_URL")
    assert release_url(release) == "https://storage.googleapis.com/mixer_models/imagenet1k/Mixer-B_16.npz"
    monkeypatch.setenv("ALLMLP_WEIGHTS_URL", "http://weights.internal/allmlp/")
    assert release_url(release) == "http://weights.internal/allmlp/mixer_models/imagenet1k/Mixer-B_16.npz"

    monkeypatch.delenv("ALLMLP_WEIGHTS_URL")
    data, _ = official_npz(TINY_MIXER)
    server.put("mixer_models/gsam/Mixer-S_32.npz", data)
    assert cli(["download", "mixer_s32_224.gsam", "--mirror", server.url]) == 0
    out = capsys.readouterr().out
    assert f"mixer_s32_224.gsam: {cache_dir() / 'mixer_models/gsam/Mixer-S_32.npz'}" in out
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in out
    assert server.requests == [("/mixer_models/gsam/Mixer-S_32.npz", None)]


def test_a_browser_host_says_where_to_save_and_the_dropped_file_is_used(server, monkeypatch, capsys):
    monkeypatch.delenv("ALLMLP_WEIGHTS_URL")
    release = get_release("vip_s7")
    target = cache_dir() / "houqb/VisionPermutator/vip_s7.pth"
    assert cli(["download", "vip_s7"]) == 1
    err = capsys.readouterr().err
    assert f"{release.page} needs a browser" in err
    assert f"save it as {target}" in err
    with pytest.raises(DownloadError, match="drive.google.com"):
        allmlp.create_model("vip_s7", pretrained=True, **TINY_VIP)

    torch.manual_seed(0)
    authors = allmlp.create_model("vip_s7", **TINY_VIP)
    target.parent.mkdir(parents=True)
    target.write_bytes(torch_bytes({"model": authors.state_dict()}))  # what the user saved from the page
    model = allmlp.create_model("vip_s7", pretrained=True, **TINY_VIP)
    assert torch.equal(model.head.weight, authors.head.weight)
    assert server.requests == []


def test_a_file_placed_by_hand_is_checked_against_the_known_size(server):
    data, _ = official_npz(TINY_MIXER)
    release = WeightRelease("t", "test", 1000, "test", file_name="hand/w.npz", size=len(data) + 5, page="https://x/")
    placed = cache_dir() / "hand/w.npz"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(data)
    expected = f"{placed} (in the cache; delete it to download it again): expected {len(data) + 5} bytes"
    with pytest.raises(DownloadError, match=re.escape(f"{expected}, received {len(data)}")):
        fetch_release(release, "test.t")
    assert placed.exists()  # the user's file is reported, not deleted
    assert fetch_release(replace(release, size=len(data)), "test.t") == placed


def test_content_that_is_not_the_format_its_name_says_is_refused(server, tmp_path):
    release = custom_release(server, b"<!DOCTYPE html><html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(DownloadError, match=r"its name says npz, its content is unrecognised weight file") as err:
        fetch_release(release, "test.t", progress=False)
    assert "nothing was kept" in str(err.value)
    assert not (cache_dir() / "custom/w.npz").exists()

    server.put("custom/w.npz", safetensors_bytes({"w": torch.zeros(2)}, tmp_path))
    with pytest.raises(DownloadError, match="its name says npz, its content is safetensors"):
        fetch_release(release, "test.t", progress=False)


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_downloaded_pickle_with_code_is_refused_before_it_runs(server, tmp_path):
    marker = tmp_path / "pwned"
    server.put(get_release("cyclemlp_b1").file_name, torch_bytes({"model": {"x": _Hostile(marker)}}))
    with pytest.raises(allmlp.WeightsError, match="never unpickled|refused"):
        allmlp.create_model("cyclemlp_b1", pretrained=True, **TINY_CYCLEMLP)
    assert not marker.exists()


def test_download_all_fetches_every_release_from_a_mirror(server, capsys, tmp_path):
    files = {
        ".npz": official_npz(TINY_MIXER)[0],
        ".pth": torch_bytes({"model": {"w": torch.zeros(1)}}),
        ".tar": torch_bytes({"w": torch.zeros(1)}),  # Wave-MLP's WaveMLP_*.pth.tar
        ".safetensors": safetensors_bytes({"w": torch.zeros(1)}, tmp_path),
    }
    releases = [release for entry in REGISTRY.values() for release in entry.releases]
    for release in releases:
        server.put(release.file_name, files[Path(release.file_name).suffix])
    assert cli(["download", "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(releases)
    assert all((cache_dir() / release.file_name).is_file() for release in releases)


def test_release_names_and_argument_errors(server):
    assert get_release("mixer_b16_224").tag == "imagenet1k"
    with pytest.raises(ValueError, match="no release 'jft'; published: imagenet1k, imagenet21k, sam, gsam"):
        allmlp.create_model("mixer_b16_224", pretrained="jft")
    with pytest.raises(ValueError, match="mixer_h14_224 has no published weights"):
        allmlp.create_model("mixer_h14_224", pretrained=True)
    with pytest.raises(ValueError, match="either pretrained or weights"):
        allmlp.create_model("mixer_b16_224", pretrained=True, weights="x.npz")
    assert cli(["download"]) == 2
    assert server.requests == []


def test_cache_folder_follows_allmlp_home_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLMLP_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ALLMLP_HOME")
    assert cache_dir() == tmp_path / "x" / "allmlp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "allmlp"
