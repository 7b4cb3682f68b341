"""Registry, download, cache and conversion of checkpoints, without the internet.

A local HTTP server plays both GitHub (``/<owner>/<repo>/raw/<commit>/<path>``,
reached through MITDENOISE_GITHUB_ENDPOINT) and the Hugging Face Hub
(``/<repo_id>/resolve/<revision>/<file>``, through HF_ENDPOINT), serving the parity
fixtures and counting requests. Every test gets its own HF_HOME under tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mitdenoise import Denoiser, checkpoints, hub, registry
from mitdenoise.errors import ModelLoadError
from mitdenoise.model import ModelConfig
from mitdenoise.checkpoints import git_blob_id, load_model, read_validation
from mitdenoise.registry import REGISTRY, resolve_model, shipped_checkpoint
from mitdenoise.cli.models import convert_command, download_command, models_command

COMMIT = registry.AUTHORS_COMMIT
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("two_threads")


class Origin:
    """What the fake GitHub/Hub serves, what it was asked, and how it misbehaves."""

    def __init__(self) -> None:
        self.github: dict[str, bytes] = {}  # "/owner/repo/raw/commit/path" -> bytes
        self.hub: dict[tuple[str, str], bytes] = {}  # (repo_id, filename) -> bytes
        self.requests: list[str] = []
        self.connections = 0  # accepted TCP connections, requests or not
        self.tamper: str | None = None  # "flip" a byte, "short" (consistent length), "truncate" (connection cut)
        # "silent": read the request, never answer; "partial-then-hang": send the headers and half the
        # body, then neither more nor a close
        self.stall: str | None = None
        self.stalled = threading.Event()  # set once a stalled answer has sent what it will send
        self.release = threading.Event()  # set at teardown: stalled handlers end
        self.url = ""

    def serve_github(self, repo: str, path: str, content: bytes) -> None:
        self.github[f"/{repo}/raw/{COMMIT}/{path}"] = content

    def lookup(self, raw_path: str) -> tuple[bytes | None, dict[str, str]]:
        if raw_path in self.github:
            return self.github[raw_path], {}
        parts = raw_path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{parts[0]}/{parts[1]}"
            revision = urllib.parse.unquote(parts[3])
            filename = urllib.parse.unquote("/".join(parts[4:]))
            content = self.hub.get((repo_id, filename))
            commit = revision if len(revision) == 40 else HUB_COMMIT
            headers = {"X-Repo-Commit": commit}
            if content is not None:
                headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            else:
                headers["X-Error-Code"] = "EntryNotFound"
            return content, headers
        return None, {}


def make_handler(origin: Origin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.serve(with_body=False)

        def do_GET(self) -> None:
            self.serve(with_body=True)

        def serve(self, with_body: bool) -> None:
            origin.requests.append(f"{self.command} {self.path}")
            if origin.stall == "silent":
                origin.stalled.set()
                origin.release.wait(60)
                self.close_connection = True
                return
            content, headers = origin.lookup(self.path.split("?")[0])
            if content is None:
                self.send_response(404)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, declared = content, len(content)
            if origin.tamper == "flip":
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
            elif origin.tamper == "short":
                data = data[: len(data) // 2]
                declared = len(data)
            elif origin.tamper == "truncate":
                data = data[: len(data) // 2]
                self.close_connection = True
            if origin.stall == "partial-then-hang":
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                origin.stalled.set()
                origin.release.wait(60)
                self.close_connection = True
                return
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            if with_body:
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (e.g. refused an oversized file)

    return Handler


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty HF_HOME; nothing else in the environment points elsewhere."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # huggingface_hub's HTTP client refuses requests when this import-time flag is set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return home


@pytest.fixture
def origin(fixtures_dir, hf_home, monkeypatch):
    from huggingface_hub.utils import close_session

    state = Origin()

    class CountingServer(ThreadingHTTPServer):
        def verify_request(self, request, client_address) -> bool:
            state.connections += 1
            return True

        def handle_error(self, request, client_address) -> None:
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                super().handle_error(request, client_address)  # a client that hung up is no news

    server = CountingServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", state.url)
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    close_session()  # a client built before NO_PROXY was set would keep its proxies
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()
    close_session()


def register_fixture(monkeypatch, fixtures_dir: Path, origin: Origin, name: str, fixture: str, **fields):
    """Serve a fixture .pth on the GitHub route as registry entry ``name``, with its real git blob id."""
    path = fixtures_dir / fixture
    repo_path = f"model_zoo/{fixture}"
    base = REGISTRY.get(name) or REGISTRY["masked-denoising"]
    entry = dataclasses.replace(
        base, name=name, github_repo=registry.AUTHORS_REPO, commit=COMMIT, path=fields.pop("path", repo_path),
        git_blob=git_blob_id(path), **fields,
    )
    origin.serve_github(registry.AUTHORS_REPO, entry.path, path.read_bytes())
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def cache_files(hf_home: Path) -> list[Path]:
    root = hf_home / "hub" / "mitdenoise"
    return sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts) if root.exists() else []


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# --- registry --------------------------------------------------------------------------------------


def test_registry_pins_the_authors_files_by_commit_and_git_blob(monkeypatch):
    monkeypatch.delenv("MITDENOISE_GITHUB_ENDPOINT", raising=False)
    masked, baseline = REGISTRY["masked-denoising"], REGISTRY["masked-denoising-baseline"]
    assert masked.url == (
        "https://github.com/haoyuc/MaskedDenoising/raw/9cd4c62a7a82178d86f197e11f2d0ba3ab1fbd5a/model_zoo/input_mask_80_90.pth"
    )
    assert masked.git_blob == "deafdf08ce4e6f69170f6f31bb3a32da9dee8cf5"
    assert (masked.attn_mask_ratio, masked.global_residual) == ((75, 75), False)
    assert baseline.url.endswith(f"/haoyuc/MaskedDenoising/raw/{COMMIT}/model_zoo/baseline.pth")
    assert baseline.git_blob == "bd7ab9e05a0e45c32991a8c375ecd331d569768e"
    assert (baseline.attn_mask_ratio, baseline.global_residual) == ((0, 0), False)
    assert registry.DEFAULT_MODEL == "masked-denoising" and registry.FALLBACK_MODEL == "mitdenoise-auto"
    assert all(REGISTRY[part].shipped for part in registry.PIPELINES[registry.FALLBACK_MODEL].values())
    assert not REGISTRY[registry.DEFAULT_MODEL].shipped
    for entry in REGISTRY.values():
        assert entry.license and "Masked Image Training" in entry.citation
    monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", "http://127.0.0.1:9/")
    assert masked.url.startswith("http://127.0.0.1:9/haoyuc/")


def test_git_blob_id_is_what_git_computes(tmp_path):
    (tmp_path / "f").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "f") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_unknown_name_lists_the_known_ones(hf_home):
    with pytest.raises(ModelLoadError) as info:
        resolve_model("nope")
    assert str(info.value).startswith(
        "unknown model 'nope': not a file and not one of: masked-denoising, mitdenoise-auto, mitdenoise-mild, "
        "mitdenoise-camera, mitdenoise-baseline, masked-denoising-baseline"
    )


@pytest.mark.parametrize("old", ["mitdenoise", "mitdenoise-masked"])
def test_the_removed_masked_checkpoints_names_say_why_and_what_to_use(old, hf_home):
    for call in (resolve_model, registry.download):
        with pytest.raises(ModelLoadError) as info:
            call(old)
        assert str(info.value) == (
            f"model '{old}' was removed: our undertrained masked checkpoint made images worse "
            "(weights/README.md keeps its numbers); use masked-denoising, the authors' masked checkpoint (the default)"
        )
    assert old not in REGISTRY


def test_missing_path_says_file_not_found(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found: .*missing.pth"):
        resolve_model(str(tmp_path / "missing.pth"))
    with pytest.raises(ModelLoadError, match="model file not found"):
        resolve_model(tmp_path / "missing.safetensors")


def test_local_path_resolves_to_itself(fixtures_dir):
    path = fixtures_dir / "official_tiny_random.pth"
    assert resolve_model(str(path)) == path
    assert resolve_model(path) == path


# --- download, verify, convert, cache ------------------------------------------------------------


def test_first_use_downloads_verifies_converts_and_then_uses_the_cache_without_requests(
    origin, fixtures_dir, hf_home, monkeypatch
):
    register_fixture(monkeypatch, fixtures_dir, origin, "masked-denoising", "official_tiny_random.pth",
                     path="model_zoo/input_mask_80_90.pth")
    path = resolve_model("masked-denoising")
    assert origin.requests == [f"GET /haoyuc/MaskedDenoising/raw/{COMMIT}/model_zoo/input_mask_80_90.pth"]
    assert path.suffix == ".safetensors"
    assert path.is_relative_to(hf_home / "hub" / "mitdenoise")  # HF_HOME honoured
    assert cache_files(hf_home) == [path]  # only the converted file: no .pth, no temp file left
    meta = metadata_of(path)
    assert meta[checkpoints.SOURCE_BLOB_KEY] == git_blob_id(fixtures_dir / "official_tiny_random.pth")
    assert meta[checkpoints.SOURCE_KEY].startswith("https://github.com/haoyuc/MaskedDenoising/raw/")
    model = load_model(path)
    assert model.config.attn_mask_ratio == (75, 75) and not model.config.global_residual
    assert model.config.embed_dim == 12

    origin.requests.clear()
    assert resolve_model("masked-denoising") == path
    assert registry.download("masked-denoising") == path
    assert origin.requests == []  # cache hit: zero requests


def test_a_download_reports_its_progress_to_the_caller_and_logs_its_end_without_printing(
    origin, fixtures_dir, hf_home, monkeypatch, caplog, capfd
):
    import logging

    register_fixture(monkeypatch, fixtures_dir, origin, "masked-denoising", "official_tiny_random.pth")
    size = (fixtures_dir / "official_tiny_random.pth").stat().st_size
    calls = []
    with caplog.at_level(logging.INFO, logger="mitdenoise"):
        path = registry.download("masked-denoising", on_download=lambda *a: calls.append(a))
    assert calls[0] == ("masked-denoising", 0, size) and calls[-1] == ("masked-denoising", size, size)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    (record,) = [r for r in caplog.records if r.name == "mitdenoise.registry"]
    assert record.getMessage().startswith("downloaded masked-denoising (") and str(path) in record.getMessage()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # the library itself writes nothing to the terminal


def test_baseline_entry_converts_with_its_mask_off(origin, fixtures_dir, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "masked-denoising-baseline", "official_tiny_random.pth",
                     path="model_zoo/baseline.pth")
    assert load_model(resolve_model("masked-denoising-baseline")).config.attn_mask_ratio == (0, 0)


def test_full_checkpoint_download_matches_loading_the_pth_itself(origin, fixtures_dir, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-full", "official_full_random.pth")
    converted = load_model(resolve_model("fixture-full"))
    direct = load_model(fixtures_dir / "official_full_random.pth")
    assert converted.config == direct.config == ModelConfig()
    for (k1, v1), (k2, v2) in zip(converted.state_dict().items(), direct.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_a_changed_registry_config_is_applied_to_the_cached_file_without_download(origin, fixtures_dir, monkeypatch):
    entry = register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    path = resolve_model("fixture-tiny")
    monkeypatch.setitem(REGISTRY, "fixture-tiny", dataclasses.replace(entry, attn_mask_ratio=(50, 60)))
    origin.requests.clear()
    assert resolve_model("fixture-tiny") == path
    assert origin.requests == []
    assert load_model(path).config.attn_mask_ratio == (50, 60)


@pytest.mark.parametrize("tamper", ["flip", "short", "truncate"])
def test_corrupt_or_truncated_download_is_rejected_and_deleted(origin, fixtures_dir, hf_home, monkeypatch, tamper):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    origin.tamper = tamper
    with pytest.raises(ModelLoadError) as info:
        resolve_model("fixture-tiny")
    message = str(info.value)
    assert "checksum mismatch" in message and "deleted; try again" in message and "fixture-tiny" in message
    assert ("the transfer was cut short after" in message) == (tamper == "truncate")
    assert "\n" not in message
    assert cache_files(hf_home) == []
    assert not registry.is_cached(REGISTRY["fixture-tiny"])
    origin.tamper = None  # the next try succeeds
    assert load_model(resolve_model("fixture-tiny")).config.embed_dim == 12


def test_missing_file_on_the_server_is_a_clear_error(origin, fixtures_dir, hf_home, monkeypatch):
    entry = register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    origin.github.clear()
    with pytest.raises(ModelLoadError, match=r"cannot download model 'fixture-tiny' from .*: HTTP 404"):
        resolve_model("fixture-tiny")
    assert origin.requests == [f"GET /haoyuc/MaskedDenoising/raw/{COMMIT}/{entry.path}"]
    assert cache_files(hf_home) == []


def test_download_over_the_size_limit_is_refused_before_writing(origin, fixtures_dir, hf_home, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(ModelLoadError, match="refusing to download model 'fixture-tiny'.*over the 1000 bytes limit"):
        resolve_model("fixture-tiny")
    assert cache_files(hf_home) == []


def test_offline_with_empty_cache_says_how_to_get_the_file(origin, fixtures_dir, monkeypatch):
    entry = register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model("fixture-tiny")
    message = str(info.value)
    assert "offline mode is on" in message
    assert entry.url in message and "`mitdenoise download fixture-tiny`" in message and "--model PATH" in message
    assert "\n" not in message
    assert origin.requests == []


def test_offline_with_the_file_cached_works_without_requests(origin, fixtures_dir, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    path = resolve_model("fixture-tiny")
    origin.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("fixture-tiny") == path
    assert origin.requests == []


def test_connection_refused_says_how_to_get_the_file(origin, fixtures_dir, hf_home, monkeypatch):
    entry = register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelLoadError) as info:
        resolve_model("fixture-tiny")
    message = str(info.value)
    assert "cannot connect to 127.0.0.1" in message
    assert f"http://127.0.0.1:{port}/haoyuc/MaskedDenoising/raw/{COMMIT}/{entry.path}" in message
    assert "`mitdenoise download fixture-tiny`" in message and "--model PATH" in message
    assert "\n" not in message
    assert cache_files(hf_home) == []


def test_hf_hub_cache_variable_wins_over_hf_home(origin, fixtures_dir, hf_home, tmp_path, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_model("fixture-tiny").is_relative_to(tmp_path / "elsewhere" / "mitdenoise")


# --- hf:// ---------------------------------------------------------------------------------------


def test_hf_file_is_downloaded_into_the_hub_cache_and_loads(origin, fixtures_dir, hf_home):
    content = (fixtures_dir / "official_tiny_random.safetensors").read_bytes()
    origin.hub[("someone/mit-test", "weights/tiny.safetensors")] = content
    path = resolve_model("hf://someone/mit-test/weights/tiny.safetensors")
    assert path.is_relative_to(hf_home / "hub" / "models--someone--mit-test")
    assert path.read_bytes() == content
    assert [r.split()[0] for r in origin.requests] == ["HEAD", "GET"]
    assert "/someone/mit-test/resolve/main/weights/tiny.safetensors" in origin.requests[1]
    model = load_model(path)
    assert model.config.embed_dim == 12
    state = load_file(str(fixtures_dir / "official_tiny_random.safetensors"))
    assert torch.equal(model.conv_last.weight, state["conv_last.weight"])

    # offline: the cached copy, no request
    origin.requests.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        assert resolve_model("hf://someone/mit-test/weights/tiny.safetensors") == path
    assert origin.requests == []


def test_hf_revision_after_the_file_or_after_the_repo(origin, fixtures_dir, hf_home):
    content = (fixtures_dir / "official_tiny_random.safetensors").read_bytes()
    origin.hub[("someone/mit-test", "tiny.safetensors")] = content
    path = resolve_model(f"hf://someone/mit-test/tiny.safetensors@{HUB_COMMIT}")
    assert HUB_COMMIT in path.parts
    origin.requests.clear()
    assert resolve_model(f"hf://someone/mit-test@{HUB_COMMIT}/tiny.safetensors") == path
    assert origin.requests == []  # a pinned commit already cached: no request
    assert hub.parse_hf_spec("hf://o/r/a/b.safetensors@refs/pr/3") == ("model", "o/r", "a/b.safetensors", "refs/pr/3")
    assert hub.parse_hf_spec("hf://datasets/o/r@v1/b.pth") == ("dataset", "o/r", "b.pth", "v1")


def test_hf_errors_are_one_line(origin, hf_home, monkeypatch):
    with pytest.raises(ModelLoadError, match="no file 'missing.safetensors' in someone/mit-test"):
        resolve_model("hf://someone/mit-test/missing.safetensors")
    with pytest.raises(ModelLoadError, match="it names a repository but no file"):
        resolve_model("hf://someone/mit-test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    origin.requests.clear()
    with pytest.raises(ModelLoadError) as info:
        resolve_model("hf://someone/mit-test/tiny.safetensors")
    message = str(info.value)
    assert "offline mode is on" in message and "--model PATH" in message and str(hf_home / "hub") in message
    assert "\n" not in message and origin.requests == []


# --- safety -------------------------------------------------------------------------------------


class CreatesAFile:
    """Unpickling this would create a file: what a hostile checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv_first.weight": torch.zeros(1), "payload": CreatesAFile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(ModelLoadError) as info:
        load_model(evil)
    assert "refused" in str(info.value) and str(evil) in str(info.value) and "io.open" in str(info.value)
    assert not marker.exists()


def test_a_pickle_with_opcodes_torch_does_not_allow_is_refused(tmp_path):
    (tmp_path / "odd.pth").write_bytes(b"\x80\x02garbage")  # 'g' (GET) and friends: not a state dict
    with pytest.raises(ModelLoadError, match="not a plain state dict .*refused for safety"):
        load_model(tmp_path / "odd.pth")


@pytest.mark.parametrize("content", [b"hello", b"", b"PK\x03\x04garbage", b"\x80\x02"])
def test_garbage_is_not_a_pytorch_checkpoint(tmp_path, content):
    (tmp_path / "junk.pth").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"cannot load .*junk.pth: not a PyTorch checkpoint \(") as info:
        load_model(tmp_path / "junk.pth")
    assert "\n" not in str(info.value)


def test_wrong_shapes_are_named(fixtures_dir, tmp_path):
    state = torch.load(fixtures_dir / "official_tiny_random.pth", weights_only=True)
    state["conv_last.weight"] = torch.zeros(3, 12, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match=r"conv_last.weight has shape \(3, 12, 5, 5\), the network expects \(3, 12, 3, 3\)"):
        load_model(tmp_path / "bad.pth")


def test_integer_tensor_where_floats_belong_is_refused(fixtures_dir, tmp_path):
    state = load_file(str(fixtures_dir / "official_tiny_random.safetensors"))
    state["conv_last.weight"] = torch.ones(state["conv_last.weight"].shape, dtype=torch.int32)
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(ModelLoadError, match="conv_last.weight has dtype torch.int32, expected a floating-point tensor"):
        load_model(tmp_path / "int.safetensors")


def test_metadata_that_lies_about_the_tensors_is_refused(fixtures_dir, tmp_path):
    state = torch.load(fixtures_dir / "official_full_random.pth", weights_only=True)
    lying = ModelConfig(embed_dim=96)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lie.safetensors"),
              metadata={checkpoints.CONFIG_KEY: lying.to_json()})
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "lie.safetensors")
    assert str(info.value) == (
        f"cannot load {tmp_path / 'lie.safetensors'}: the config in its metadata does not match the tensors "
        "(embed_dim 96 in the config, 60 in the tensors)"
    )


def test_file_over_the_size_limit_is_refused(fixtures_dir, monkeypatch):
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(ModelLoadError, match=r"2\.2 MiB is over the 1000 bytes limit for a checkpoint"):
        load_model(fixtures_dir / "official_tiny_random.pth")


# --- the commands -------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    from rich.console import Console

    from mitdenoise.cli import models as models_cli

    monkeypatch.setattr(models_cli, "out", Console(width=240))
    app = typer.Typer()
    app.command("models")(models_command)
    app.command("download")(download_command)
    app.command("convert")(convert_command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_convert_then_load_gives_exactly_the_pth_output(cli, fixtures_dir, tmp_path):
    src = fixtures_dir / "official_full_random.pth"
    dst = tmp_path / "x.safetensors"
    result = cli("convert", str(src), str(dst))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dst)
    assert "attention mask 75 %" in result.stderr
    assert ModelConfig.from_json(metadata_of(dst)[checkpoints.CONFIG_KEY]) == ModelConfig()
    x = load_file(str(fixtures_dir / "official_full_io.safetensors"))["input_odd"]
    outputs = []
    for path in (src, dst):
        model = load_model(path)
        with torch.no_grad():
            outputs.append(model(x, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outputs[0], outputs[1])


def test_convert_options_set_what_shapes_cannot_tell(cli, fixtures_dir, tmp_path):
    src = str(fixtures_dir / "official_tiny_random.pth")
    cases = {
        ("--attn-mask-ratio", "0"): dict(attn_mask_ratio=(0, 0)),
        ("--attn-mask-ratio", "70,80", "--global-residual"): dict(attn_mask_ratio=(70, 80), global_residual=True),
        ("--config", "masked-denoising-baseline"): dict(attn_mask_ratio=(0, 0), global_residual=False),
        ("--config", '{"attn_mask_ratio": [10, 20]}'): dict(attn_mask_ratio=(10, 20)),
    }
    for i, (args, expected) in enumerate(cases.items()):
        dst = tmp_path / f"{i}.safetensors"
        result = cli("convert", src, str(dst), *args)
        assert result.exit_code == 0, result.output
        config = load_model(dst).config
        for key, value in expected.items():
            assert getattr(config, key) == value, (args, key)


def test_convert_keeps_a_checkpoints_validation_record_unless_the_config_changes(cli, tmp_path):
    """The record is what `denoise` warns from: a copy (or an in-place rewrite) of the same
    model keeps it; a file with another attention mask is another model and drops it."""
    import shutil

    src = tmp_path / "mild.safetensors"
    shutil.copy(shipped_checkpoint("mitdenoise-mild"), src)
    record = read_validation(src)
    assert record is not None and record["iteration"] > 0
    assert cli("convert", str(src), str(tmp_path / "copy.safetensors")).exit_code == 0
    assert read_validation(tmp_path / "copy.safetensors") == record
    assert cli("convert", str(src), str(src), "--force").exit_code == 0
    assert read_validation(src) == record
    assert cli("convert", str(src), str(tmp_path / "on.safetensors"), "--attn-mask-ratio", "75").exit_code == 0
    assert read_validation(tmp_path / "on.safetensors") is None
    assert load_model(tmp_path / "on.safetensors").config.attn_mask_ratio == (75, 75)


@pytest.mark.parametrize(
    "args,code,expected",
    [
        (("--config", '{"embed_dim": 96, "num_heads": [2, 2]}'), 1, "embed_dim 96 in the config, 12 in the tensors"),
        (("--config", '{"colour": 1}'), 2, "unknown config fields ['colour']"),
        (("--config", "{nope"), 2, "not valid JSON"),
        (("--config", "nope"), 2, "not JSON, not a .json file and not one of: masked-denoising"),
        (("--attn-mask-ratio", "150"), 2, "--attn-mask-ratio must be N or LOW,HIGH"),
    ],
)
def test_convert_errors_are_one_line(cli, fixtures_dir, tmp_path, args, code, expected):
    dst = tmp_path / "out.safetensors"
    result = cli("convert", str(fixtures_dir / "official_tiny_random.pth"), str(dst), *args)
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not dst.exists()


def test_convert_refuses_to_overwrite_and_odd_outputs(cli, fixtures_dir, tmp_path):
    src = str(fixtures_dir / "official_tiny_random.pth")
    (tmp_path / "taken.safetensors").write_text("mine")
    result = cli("convert", src, str(tmp_path / "taken.safetensors"))
    assert result.exit_code == 1 and "exists (--force replaces it)" in result.stderr
    assert (tmp_path / "taken.safetensors").read_text() == "mine"
    assert cli("convert", src, str(tmp_path / "taken.safetensors"), "--force").exit_code == 0
    result = cli("convert", src, str(tmp_path / "out.pth"))
    assert result.exit_code == 2 and "must end in .safetensors" in result.stderr
    result = cli("convert", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors"))
    assert result.exit_code == 1 and "model file not found" in result.stderr


def test_models_lists_the_registry_and_what_is_cached(cli, origin, fixtures_dir, monkeypatch):
    register_fixture(monkeypatch, fixtures_dir, origin, "fixture-tiny", "official_tiny_random.pth")
    rows = {row["name"]: row for row in json.loads(cli("models", "--json").stdout)}
    assert {"mitdenoise-mild", "masked-denoising", "masked-denoising-baseline", "fixture-tiny"} <= set(rows)
    assert "mitdenoise" not in rows and not rows["fixture-tiny"]["cached"]
    assert rows["mitdenoise-mild"]["cached"] and not rows["masked-denoising"]["cached"]
    assert [name for name, row in rows.items() if row["default"]] == ["masked-denoising"]
    assert [name for name, row in rows.items() if row["fallback"]] == ["mitdenoise-auto"]
    assert [name for name, row in rows.items() if row["shipped"]] == [
        "mitdenoise-auto", "mitdenoise-mild", "mitdenoise-camera", "mitdenoise-baseline"]
    assert rows["mitdenoise-mild"]["source"] == "shipped: weights/mitdenoise-mild.safetensors"
    auto = rows["mitdenoise-auto"]
    assert auto["parts"] == ["mitdenoise-mild", "mitdenoise-camera"] and auto["cached"]
    assert auto["source"] == "shipped: weights/mitdenoise-mild.safetensors + shipped: weights/mitdenoise-camera.safetensors"
    assert auto["size"] == rows["mitdenoise-mild"]["size"] + rows["mitdenoise-camera"]["size"]
    assert rows["masked-denoising"]["git_blob"] == "deafdf08ce4e6f69170f6f31bb3a32da9dee8cf5"
    assert origin.requests == []  # listing never goes online

    result = cli("download", "fixture-tiny", "-q")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    rows = {row["name"]: row for row in json.loads(cli("models", "--json").stdout)}
    assert rows["fixture-tiny"]["cached"] and rows["fixture-tiny"]["path"] == str(path)
    assert rows["fixture-tiny"]["size"] == path.stat().st_size

    table = cli("models").stdout
    for text in ("name", "what it is", "size", "cached", "masked-denoising-baseline", "fixture-tiny",
                 "masked-denoising (default)", "mitdenoise-auto (fallback)", "hf://owner/repo", "--json"):
        assert text in table
    assert [line.split()[-1] for line in table.splitlines() if line.startswith(" mitdenoise-")] == ["shipped"] * 4


def test_download_command_errors_are_one_line(cli, hf_home, monkeypatch):
    result = cli("download", "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unknown model 'nope'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("download", "masked-denoising")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "raw/9cd4c62a7a82178d86f197e11f2d0ba3ab1fbd5a/model_zoo/input_mask_80_90.pth" in result.stderr


def test_validation_record_is_read_back_and_a_malformed_one_is_ignored(tmp_path):
    from mitdenoise.model import SwinIR

    net = SwinIR(ModelConfig(embed_dim=12, depths=(2,), num_heads=(2,)))
    record = {"iteration": 7, "sets": {"gaussian15": {"psnr": 26.5, "noisy_psnr": 25.0}}}
    checkpoints.save_safetensors(net, tmp_path / "ok.safetensors", extra_metadata={checkpoints.VALIDATION_KEY: json.dumps(record)})
    assert checkpoints.read_validation(tmp_path / "ok.safetensors") == record
    assert registry.validation_warning(record) is None
    worse = {"iteration": 7, "sets": {"gaussian15": {"psnr": 26.5, "noisy_psnr": 25.0}, "poisson2": {"psnr": 9.0, "noisy_psnr": 23.25}}}
    assert registry.validation_warning(worse).startswith(
        "this model made its validation images worse (poisson2 9.00 dB out vs 23.25 dB in; iteration 7)"
    )
    for bad in ("not json", json.dumps({"sets": {}}), json.dumps({"iteration": 1, "sets": {"g": {"psnr": "x"}}})):
        checkpoints.save_safetensors(net, tmp_path / "bad.safetensors", extra_metadata={checkpoints.VALIDATION_KEY: bad})
        assert checkpoints.read_validation(tmp_path / "bad.safetensors") is None, bad
    checkpoints.save_safetensors(net, tmp_path / "none.safetensors")
    assert checkpoints.read_validation(tmp_path / "none.safetensors") is None
    # numbers written as strings are read as numbers, so the warning can format them
    texts = {"iteration": "3", "sets": {"a": {"psnr": "1", "noisy_psnr": "2"}}}
    checkpoints.save_safetensors(net, tmp_path / "texts.safetensors", extra_metadata={checkpoints.VALIDATION_KEY: json.dumps(texts)})
    read = checkpoints.read_validation(tmp_path / "texts.safetensors")
    assert read == {"iteration": 3, "sets": {"a": {"psnr": 1.0, "noisy_psnr": 2.0}}}
    assert registry.validation_warning(read).startswith("this model made its validation images worse (a 1.00 dB out vs 2.00 dB in")


def _tiny_state(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "official_tiny_random.safetensors"))


def _with(state: dict, **changes) -> dict:
    state = dict(state)
    for key, value in changes.items():
        if value is None:
            state.pop(key.replace("__", "."))
        else:
            state[key.replace("__", ".")] = value
    return state


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d, s: (d / "x.safetensors").write_bytes(b"hi"), r"not a valid safetensors file"),
        (lambda d, s: save_file(s, str(d / "x.safetensors"), metadata={checkpoints.CONFIG_KEY: '{"colour": 1}'}),
         r"bad config in metadata"),
        (lambda d, s: torch.save({"a": torch.zeros(1)}, d / "x.pth"), r"not a SwinIR state dict \(missing conv_first.weight\)"),
        (lambda d, s: torch.save(_with(s, extra__weight=torch.zeros(1)), d / "x.pth"),
         r"state dict does not match the network: unexpected 1 keys \(e.g. extra.weight\)"),
        (lambda d, s: torch.save(_with(s, conv_last__bias=None), d / "x.pth"),
         r"state dict does not match the network: missing 1 keys \(e.g. conv_last.bias\)"),
        (lambda d, s: torch.save(
            _with(s, layers__0__residual_group__blocks__0__attn__relative_position_index=torch.zeros(64, 64, dtype=torch.long)),
            d / "x.pth"), r"relative_position_index differs from the standard relative-position index"),
    ],
    ids=["not-safetensors", "bad-metadata", "not-swinir", "extra-key", "missing-key", "tampered-index"],
)
def test_broken_checkpoints_are_one_line_errors_naming_the_file(fixtures_dir, tmp_path, make, expected):
    make(tmp_path, _tiny_state(fixtures_dir))
    (path,) = tmp_path.iterdir()
    with pytest.raises(ModelLoadError, match=rf"^cannot load {path}: .*{expected}") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_a_folder_or_a_missing_shipped_file_as_the_model_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=rf"^model file not found: {tmp_path} is a directory$"):
        resolve_model(str(tmp_path))
    monkeypatch.setattr(registry, "SHIPPED_DIRS", (tmp_path / "nowhere",))
    with pytest.raises(ModelLoadError, match=r"the shipped checkpoint .*mitdenoise-mild.safetensors is missing: "
                                             r"reinstall mitdenoise or pass --model PATH"):
        Denoiser(offline=True)
    with pytest.raises(ModelLoadError, match=r"^mitdenoise-auto is a route over several networks "
                                             r"\(mitdenoise-mild, mitdenoise-camera\), not one file: name one of them$"):
        resolve_model("mitdenoise-auto")
