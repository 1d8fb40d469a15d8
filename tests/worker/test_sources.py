"""Where images may come from: each attack of issue 11's table, through the job
functions and through a real worker, with listening sockets and file access times
that show whether anything was dialled or read."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import models
import numpy as np
import pytest
from checks import assert_close
from PIL import Image
from service import REDIS_HOST, free_port, redis_url, service_env, start_moto, start_worker

from onnxcam.engine import Explainer
from onnxcam.engine.images import Limits
from onnxcam.errors import OnnxcamError
from onnxcam.worker.jobs import ModelCache, fetch, run_job
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.settings import load_settings
from onnxcam.worker.sources import AllowList
from onnxcam.worker.store import Store

LABELS = models.CNN_LABELS

# -- what an attack could touch: sockets that count callers, files that show a read


class Listener:
    """A TCP port on loopback that counts who connects (and hangs up on them)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind((REDIS_HOST, 0))
        self.socket.listen(16)
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                caller, _ = self.socket.accept()
            except OSError:
                continue
            self.connections += 1
            caller.sendall(b"220 hello\r\n")  # an FTP greeting: a client would go on
            caller.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


def closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def untouched(path: Path) -> Path:
    """``path`` with its access time far before its modification time, so that any
    read moves it (relatime updates atime when it is older than mtime)."""
    os.utime(path, (0, time.time()))
    return path


def was_read(path: Path) -> bool:
    return path.stat().st_atime > 0


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def tree(folder: Path) -> dict[str, Path]:
    """An allowed root with a good image, a sub-folder and a link out; next to it a
    folder whose name starts like the root's, and secrets outside."""
    root, sibling, outside = folder / "root", folder / "rootfoo", folder / "outside"
    for path in (root / "sub", sibling, outside):
        path.mkdir(parents=True)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / "good.png")
    for path in (sibling / "x.png", outside / "secret.png"):
        Image.new("RGB", (8, 8)).save(path)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside)
    (outside / "canary").write_bytes(b"not a tar file, but a tar:// chain would read it")
    (outside / "control").write_bytes(b"read on purpose: shows that atime moves here")
    return {"root": root, "sibling": sibling, "outside": outside}


@pytest.fixture(scope="module")
def bundle(cnn_bundle: Path) -> bytes:
    return cnn_bundle.read_bytes()


def attacks(tree: dict[str, Path], store: Store, port: int) -> dict[str, tuple[ImageRef, str]]:
    """Issue 11's table and its cousins: each reference and the code it must end with."""
    root, outside = tree["root"], tree["outside"]
    canary = outside / "canary"
    store.put("jobs/other/00000.json", b"{}")
    store.put("inputs/sub/00000.json", b"{}")
    cases = {
        "ftp to a listening port": (f"ftp://{REDIS_HOST}:{port}/x.png", "forbidden_path"),
        "ftp to a closed port": (f"ftp://{REDIS_HOST}:{closed_port()}/x.png", "forbidden_path"),
        "http": (f"http://{REDIS_HOST}:{port}/x.png", "forbidden_path"),
        "tar chain": (f"tar://x::file://{canary}", "forbidden_path"),
        "zip chain": (f"zip://x::file://{outside}", "forbidden_path"),
        "simplecache chain": (f"simplecache::file://{canary}", "forbidden_path"),
        "a chain inside the root": (f"file://{root}/good.png::tar://x", "forbidden_path"),
        "tar chain, allowed inner file": (f"tar://x::file://{root}/good.png", "forbidden_path"),
        "file:///etc/shadow": ("file:///etc/shadow", "forbidden_path"),
        "file:// canary": (f"file://{canary}", "forbidden_path"),
        "nosuchproto": ("nosuchproto://x", "forbidden_path"),
        "memory": ("memory://x.png", "forbidden_path"),
        "local:// alias": (f"local://{canary}", "forbidden_path"),
        "s3, not listed": ("s3://elsewhere/x.png", "forbidden_path"),
        "a store folder": (store.uri("inputs/sub"), "bad_image"),
        "another job's record": (store.uri("jobs/other/00000.json"), "forbidden_path"),
        "a bundle": (store.uri("bundles"), "forbidden_path"),
        "a NUL byte in a URI": (f"file://{root}/good.png\x00", "bad_path"),
    }
    refs = {name: (ImageRef(name, uri=uri), code) for name, (uri, code) in cases.items()}
    for name, path, code in (
        ("'..' escape", f"{root}/../outside/canary", "forbidden_path"),
        ("'..' into a sibling", f"{root}/../rootfoo/x.png", "forbidden_path"),
        ("a sibling named like the root", f"{tree['sibling']}/x.png", "forbidden_path"),
        ("a link out", f"{root}/link.png", "forbidden_path"),
        ("a folder link out", f"{root}/linkdir/canary", "forbidden_path"),
        ("a NUL byte in a path", f"{root}/good.png\x00.jpg", "bad_path"),
        ("an empty path", "", "bad_path"),
        ("a lone surrogate", f"{root}/\ud800.png", "bad_path"),
        ("a root folder", f"{root}/sub", "bad_image"),
        ("a missing file in the root", f"{root}/missing.png", "missing_image"),
        ("the good image", f"{root}/good.png", "ok"),
    ):
        refs[name] = (ImageRef(name or "empty", path=path), code)
    return refs


# -- through the job functions


def code_of(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except OnnxcamError as exc:
        return exc.code
    return "ok"


class IoRecorder:
    """Python's audit events for opening, dialling and importing, while recording.

    An audit hook cannot be removed, so one hook per process, switched on and off."""

    PREFIXES = ("open", "os.", "socket.", "import", "subprocess.", "ftplib.", "http.")
    events: list[str] | None = None
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.events is not None and event.startswith(cls.PREFIXES):
            cls.events.append(f"{event} {args[:1]!r}")

    def __enter__(self) -> list[str]:
        if not IoRecorder.installed:
            sys.addaudithook(IoRecorder.hook)
            IoRecorder.installed = True
        IoRecorder.events = []
        return IoRecorder.events

    def __exit__(self, *exc: object) -> None:
        IoRecorder.events = None


def test_every_attack_is_refused_without_io(tree: dict[str, Path], listener: Listener,
                                            tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    allowed = AllowList((str(tree["root"]),))
    canary, control = untouched(tree["outside"] / "canary"), untouched(tree["outside"] / "control")
    fetch(ImageRef("warm", path=str(tree["root"] / "good.png")), store, allowed, Limits())
    for name, (ref, code) in attacks(tree, store, listener.port).items():
        with IoRecorder() as events:
            got = code_of(lambda ref=ref: fetch(ref, store, allowed, Limits()))
        assert got == code, name
        if code in ("forbidden_path", "bad_path"):
            assert events == [], f"{name}: {events}"
        elif code == "ok":
            assert any(e.startswith("open") for e in events), events  # the recorder sees
    assert listener.connections == 0
    control.read_bytes()
    if was_read(control):  # else this file system keeps no access times: no evidence
        assert not was_read(canary)


@pytest.mark.parametrize("outside", [
    "file://{outside}/secret.png",
    "tar://x::file://{outside}/secret.png",
    "{root}/../outside/secret.png",
    "{root}/linkdir/secret.png",
    "{root}/link.png",
])
def test_a_refusal_says_nothing_of_existence(tree: dict[str, Path], tmp_path: Path,
                                             outside: str) -> None:
    """The same code and message for a target that exists and one that does not."""
    (tree["outside"] / "gone.png").unlink(missing_ok=True)
    (tree["root"] / "link-to-nothing.png").unlink(missing_ok=True)
    (tree["root"] / "link-to-nothing.png").symlink_to(tree["outside"] / "gone.png")
    replies = []
    for leaf, link in (("secret.png", "link.png"), ("gone.png", "link-to-nothing.png")):
        text = outside.format(root=tree["root"], outside=tree["outside"]).replace(
            "secret.png", leaf).replace("link.png", link)
        ref = ImageRef("a", uri=text) if "://" in text else ImageRef("a", path=text)
        try:
            fetch(ref, Store(str(tmp_path)), AllowList((str(tree["root"]),)), Limits())
        except OnnxcamError as exc:
            replies.append((exc.code, str(exc).replace(leaf, "LEAF").replace(link, "LEAF")))
    assert len(replies) == 2 and replies[0] == replies[1]
    assert replies[0][0] == "forbidden_path"


def test_roots_compare_whole_names(tmp_path: Path) -> None:
    from onnxcam.worker.sources import allowed_path

    (tmp_path / "root").mkdir()
    (tmp_path / "rootfoo").mkdir()
    assert allowed_path(str(tmp_path / "root" / "a"), [str(tmp_path / "root")]) \
        == tmp_path.resolve() / "root" / "a"
    for path, root in ((tmp_path / "rootfoo" / "a", tmp_path / "root"),
                       (tmp_path / "rootfoo", tmp_path / "root"),
                       (tmp_path / "root" / ".." / "rootfoo", tmp_path / "root")):
        assert code_of(lambda path=path, root=root: allowed_path(str(path), [str(root)])) \
            == "forbidden_path"
    assert allowed_path("/etc/hostname", ["/"]) == Path("/etc/hostname").resolve()


def test_a_refusal_names_the_setting_the_roots_and_the_inline_way(tmp_path: Path) -> None:
    """The same image is taken inline from anywhere: the refusal of its path says so."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "elsewhere" / "x.png"

    def refusal(settings: dict[str, object], ref: ImageRef) -> str:
        allowed = AllowList.from_settings(load_settings(**settings))
        with pytest.raises(OnnxcamError) as caught:
            fetch(ref, Store(str(tmp_path / "store")), allowed, Limits())
        assert caught.value.code == "forbidden_path"
        return str(caught.value)

    two_roots = {"allowed_roots": f"{root}:s3://bucket/in", "max_inline_image_bytes": 5000}
    assert refusal(two_roots, ImageRef("x.png", path=str(outside))) == (
        f"{outside}: outside the allowed roots (ONNXCAM_ALLOWED_ROOTS={root}:s3://bucket/in); "
        "images up to 5000 bytes can be sent inline (as data) instead "
        "(ONNXCAM_MAX_INLINE_IMAGE_BYTES)")
    none_set = {"allowed_roots": ""}  # the default inline limit: 1 MiB
    assert refusal(none_set, ImageRef("x.png", uri=f"file://{outside}")) == (
        f"file://{outside}: outside the allowed roots (ONNXCAM_ALLOWED_ROOTS is empty: no "
        "roots are set); images up to 1048576 bytes can be sent inline (as data) instead "
        "(ONNXCAM_MAX_INLINE_IMAGE_BYTES)")
    no_inline = {"allowed_roots": "s3://bucket/in", "max_inline_image_bytes": 0}
    assert refusal(no_inline, ImageRef("x.png", uri="s3://bucket/other/x.png")) == (
        "s3://bucket/other/x.png: outside the store and the allowed roots "
        "(ONNXCAM_ALLOWED_ROOTS=s3://bucket/in); inline images are off too "
        "(ONNXCAM_MAX_INLINE_IMAGE_BYTES=0)")
    relative = {"allowed_roots": "."}  # shown as the worker resolves it
    assert f"(ONNXCAM_ALLOWED_ROOTS={Path.cwd()});" in refusal(
        relative, ImageRef("x.png", path=str(outside)))


def test_a_job_keeps_its_good_image_beside_every_attack(bundle: bytes, tree: dict[str, Path],
                                                         listener: Listener,
                                                         tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    sha = store.put_bundle(bundle)
    cases = attacks(tree, store, listener.port)
    spec = JobSpec("job-attacks", sha, [ref for ref, _ in cases.values()], "gradcam",
                   [None] * len(cases))
    settings = load_settings(store_url=store.url, allowed_roots=str(tree["root"]))
    summary = run_job(spec, store, ModelCache(store, 1, "cpu"), settings)
    codes = {name: (s.get("error") or {}).get("code", "ok")
             for name, s in zip(cases, summary["images"])}
    assert codes == {name: code for name, (_, code) in cases.items()}
    assert listener.connections == 0
    good = list(cases).index("the good image")
    record = json.loads(store.get(f"jobs/job-attacks/{good:05d}.json"))
    expected = Explainer(bundle, device="cpu").explain(str(tree["root"] / "good.png"))
    assert record["target"] == int(expected.targets[0])
    assert_close(record["logits"], expected.logits[0], 1e-6, "logits")


# -- the store's own objects, by ONNXCAM_STORE_READS (issue 20, part 4)


def png_bytes(colour: tuple[int, int, int] = (30, 60, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("local", [True, False], ids=["folder store", "remote store"])
def test_a_job_reads_store_objects_only_where_the_setting_allows(tmp_path: Path,
                                                                 local: bool) -> None:
    """A store URI to another job's overlay (or a bundle) is refused unless
    ONNXCAM_STORE_READS=all; under inputs/ it is read with the default; with none,
    nothing of the store is. A folder store is reached by path too, through a root that
    holds it. The remote store is fsspec's memory filesystem (not a folder)."""
    store = Store(str(tmp_path / "store") if local else f"memory://store-{uuid.uuid4().hex}")
    data = png_bytes()
    for key in ("inputs/a.png", "jobs/other/00000.png", "bundles/x.png"):
        store.put(key, data)
    refs = {key: ImageRef("a", uri=store.uri(key))
            for key in ("inputs/a.png", "jobs/other/00000.png", "bundles/x.png")}
    if local:  # by path, through a root above the store
        refs.update({f"path {key}": ImageRef("a", path=f"{tmp_path}/store/{key}")
                     for key in ("inputs/a.png", "jobs/other/00000.png")})
        refs["file:// up and back"] = ImageRef(
            "a", uri=f"file://{tmp_path}/store/inputs/../jobs/other/00000.png")
    expected = {
        "all": dict.fromkeys(refs, "ok"),
        "inputs": {name: "ok" if "inputs/a.png" in name else "forbidden_path" for name in refs},
        "none": dict.fromkeys(refs, "forbidden_path"),
    }
    for reads, codes in expected.items():
        allowed = AllowList((str(tmp_path),), frozenset({"file", "memory"}), store_reads=reads)
        got = {name: code_of(lambda ref=ref, allowed=allowed: fetch(ref, store, allowed,
                                                                    Limits()))
               for name, ref in refs.items()}
        assert got == codes, reads
    default = AllowList.from_settings(load_settings())
    assert default.store_reads == "inputs"


@pytest.mark.parametrize("reads", ["none", "inputs"])
def test_a_store_refusal_says_nothing_of_existence(tmp_path: Path, reads: str) -> None:
    """The reply to a store URI of another job's overlay is the same, byte for byte,
    while the overlay exists and once it is gone; and for a key that never existed,
    but for the key itself."""
    store = Store(str(tmp_path / "store"))
    overlay = store.put("jobs/victim/00000.png", png_bytes())
    allowed = AllowList((), store_reads=reads)

    def reply(uri: str) -> tuple[str, str]:
        with pytest.raises(OnnxcamError) as caught:
            fetch(ImageRef("a", uri=uri), store, allowed, Limits())
        return caught.value.code, str(caught.value)

    with IoRecorder() as events:
        present = reply(overlay)
    assert events == []  # decided from the text: nothing stat'ed or opened
    store.delete("jobs/victim/00000.png")
    assert reply(overlay) == present and present[0] == "forbidden_path"
    missing = store.uri("jobs/never-was/00000.png")
    assert reply(missing)[1].replace(missing, "URI") == present[1].replace(overlay, "URI")
    assert f"(ONNXCAM_STORE_READS={reads})" in present[1]


# -- http(s) prefixes compared percent-decoded, roots with ports, path lengths


@pytest.mark.parametrize("rest", [
    "%2e%2e/secret/ok.png", "%2E%2E/secret/ok.png", ".%2e/secret/ok.png",
    "..%2Fsecret/ok.png", "a/%2e%2e%2f%2e%2e/secret/ok.png", "%252e%252e/secret/ok.png",
    "%25252e%25252e/secret/ok.png", "..%5csecret/ok.png", "a\\..\\..\\secret/ok.png",
    "%2e/ok.png", "a/%2E%2e/../secret/ok.png",
])
def test_an_http_root_is_not_left_by_encoded_dots(listener: Listener, rest: str) -> None:
    """'..' percent-encoded once, twice or three times, or made of encoded slashes and
    backslashes: refused from the text, before any connection."""
    prefix = f"http://{REDIS_HOST}:{listener.port}/imgs"
    allowed = AllowList((prefix,), frozenset({"http"}))
    before = listener.connections
    with IoRecorder() as events:
        code = code_of(lambda: fetch(ImageRef("a", uri=f"{prefix}/{rest}"),
                                     Store("/nonexistent-store"), allowed, Limits()))
    assert code == "forbidden_path"
    assert not [e for e in events if e.startswith("socket.")], events
    assert listener.connections == before


def test_an_http_root_still_reads_plain_and_encoded_names(listener: Listener) -> None:
    """A name with a space or a '%' of its own passes the check and is dialled."""
    prefix = f"http://{REDIS_HOST}:{listener.port}/imgs"
    allowed = AllowList((prefix,), frozenset({"http"}), connect_timeout=2, read_timeout=2)
    before = listener.connections
    for rest in ("ok.png", "a%20b.png", "100%25.png", "sub/..x.png", "x.png?v=%2e%2e"):
        code = code_of(lambda rest=rest: fetch(ImageRef("a", uri=f"{prefix}/{rest}"),
                                               Store("/nonexistent-store"), allowed, Limits()))
        assert code != "forbidden_path", rest  # the listener hangs up: some other code
    assert listener.connections > before


def test_roots_with_ports_parse_as_one_root() -> None:
    from onnxcam.worker.settings import split_roots

    assert split_roots("http://h:6399/imgs:/data/images") == ["http://h:6399/imgs",
                                                              "/data/images"]
    assert split_roots("/a:s3://b/in:https://u:p@h:443/x:.") == [
        "/a", "s3://b/in", "https://u:p@h:443/x", "."]
    assert split_roots("http://[::1]:8080/x::/y:") == ["http://[::1]:8080/x", "/y"]
    assert split_roots("http://h:6399:/data") == ["http://h:6399", "/data"]
    assert split_roots("") == [] and split_roots("/only") == ["/only"]
    allowed = AllowList.from_settings(load_settings(allowed_roots="http://h:6399/imgs:/data"))
    assert allowed.prefixes == ["http://h:6399/imgs"] and allowed.folders == ["/data"]


def test_a_path_over_path_max_is_bad_path_wherever_it_enters(tree: dict[str, Path]) -> None:
    """4095 bytes is the longest path Linux opens (PATH_MAX counts the NUL), 255 the
    longest name in it; longer is bad_path, by path, by URI and through the message,
    and a path too long to be a name leaves the rest of the job alone."""
    from onnxcam.worker.message import parse_job

    root = str(tree["root"])
    allowed = AllowList((root,))

    def path_of(size: int) -> str:
        path = root
        while len(path) < size:
            path += "/" + "d" * min(200, size - len(path) - 1)
        assert len(path.encode()) == size
        return path

    cases = {
        path_of(4095): "missing_image", path_of(4096): "bad_path",
        f"{root}/{'n' * 255}": "missing_image", f"{root}/{'n' * 256}": "bad_path",
        f"{root}/" + "é/" * 1400: "bad_path",  # 1400 chars of 2 bytes each: 4200 bytes
    }
    for path, code in cases.items():
        as_file_uri = "bad_path" if len(f"file://{path}".encode()) > 4095 else code
        for ref, expected in ((ImageRef("a", path=path), code), (ImageRef("a", uri=path), code),
                              (ImageRef("a", uri=f"file://{path}"), as_file_uri)):
            assert code_of(lambda ref=ref: fetch(ref, Store("/nonexistent-store"), allowed,
                                                 Limits())) == expected, (len(path), ref)
    message = {"v": 1, "bundle": "0" * 64, "method": "gradcam",
               "images": [{"path": "/" + "a" * 5000}, {"uri": "s3://b/" + "é" * 4000},
                          {"path": f"{root}/good.png"}]}
    spec = parse_job(message, "job")
    # a name over 4096 characters would be malformed; 4007 of them (8007 bytes) pass
    assert [ref.name for ref in spec.images] == ["image-0", message["images"][1]["uri"],
                                                 f"{root}/good.png"]
    assert [code_of(lambda ref=ref: fetch(ref, Store("/nonexistent-store"), allowed, Limits()))
            for ref in spec.images] == ["bad_path", "bad_path", "ok"]
    with pytest.raises(OnnxcamError, match="its name is over 4096 characters"):
        parse_job({**message, "images": [{"name": "n" * 4097, "path": "/x"}]}, "job")


# -- S3: allowed when listed, refused when not, bounded when the host is silent


@pytest.fixture(scope="module")
def moto_s3(tree: dict[str, Path]) -> Iterator[str]:
    """moto's S3 server with ``s3://onnxcam-in/ok/good.png``, ``ok/sub/x`` and
    ``other/good.png``; fsspec pointed at it for this module."""
    pytest.importorskip("s3fs")
    import fsspec.config
    import s3fs

    server = start_moto(free_port())
    endpoint = f"http://{REDIS_HOST}:{server.port}"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in credentials.items():
            patch.setenv(name, value)
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir("onnxcam-in")
            data = (tree["root"] / "good.png").read_bytes()
            for key in ("ok/good.png", "ok/sub/x.png", "other/good.png"):
                fs.pipe_file(f"onnxcam-in/{key}", data)
            yield endpoint
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_s3_images_only_under_listed_prefixes(moto_s3: str, tree: dict[str, Path],
                                              tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    data = (tree["root"] / "good.png").read_bytes()
    listed = AllowList((str(tree["root"]), "s3://onnxcam-in/ok"))
    assert fetch(ImageRef("a", uri="s3://onnxcam-in/ok/good.png"), store, listed,
                 Limits()) == data
    assert fetch(ImageRef("a", uri="S3://onnxcam-in/ok/good.png"), store, listed,
                 Limits()) == data
    for uri, allowed, code in (
        ("s3://onnxcam-in/other/good.png", listed, "forbidden_path"),
        ("s3://onnxcam-in/ok/../other/good.png", listed, "forbidden_path"),
        ("s3://onnxcam-in/okay/good.png", listed, "forbidden_path"),
        ("s3://onnxcam-in/ok/good.png", AllowList((str(tree["root"]),)), "forbidden_path"),
        ("s3://onnxcam-in/ok/good.png", AllowList(listed.roots, frozenset({"file"})),
         "forbidden_path"),
        ("s3a://onnxcam-in/ok/good.png", listed, "forbidden_path"),
        ("s3://onnxcam-in/ok/sub", listed, "bad_image"),
        ("s3://onnxcam-in/ok/missing.png", listed, "missing_image"),
    ):
        assert code_of(lambda uri=uri, allowed=allowed: fetch(
            ImageRef("a", uri=uri), store, allowed, Limits())) == code, uri


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["s3", "ftp"])
@pytest.mark.parametrize("host", ["silent", "refusing"])
def test_an_allowed_host_that_does_not_answer_ends_only_its_image(
        protocol: str, host: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Bounded by the timeouts, and final: a host that refuses is not retried."""
    silent = socket.socket()  # listens, never accepts: connects succeed, reads hang
    silent.bind((REDIS_HOST, 0))
    silent.listen(64)
    port = silent.getsockname()[1] if host == "silent" else closed_port()
    if protocol == "s3":
        pytest.importorskip("s3fs")
        import fsspec.config

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.setitem(fsspec.config.conf, "s3",
                            {"endpoint_url": f"http://{REDIS_HOST}:{port}"})
        prefix = "s3://bucket/in"
    else:
        prefix = f"ftp://{REDIS_HOST}:{port}/in"
    allowed = AllowList((prefix,), frozenset({protocol}), connect_timeout=0.5,
                        read_timeout=0.5)
    started = time.monotonic()
    try:
        code = code_of(lambda: fetch(ImageRef("a", uri=f"{prefix}/x.png"),
                                     Store(str(tmp_path)), allowed, Limits()))
    finally:
        silent.close()
    # S3: four reads of 0.5 s at most (two attempts at each of s3fs's two requests) and
    # some backoff; without the timeouts and the retry cap a silent host held it 292 s.
    assert code == "unreachable_image"
    assert time.monotonic() - started < 8


# -- through a real worker


@pytest.mark.slow
def test_a_worker_refuses_every_attack_and_serves_on(bundle: bytes, tree: dict[str, Path],
                                                     listener: Listener, moto_s3: str,
                                                     tmp_path: Path) -> None:
    from onnxcam.worker.client import Job, _app, send

    env = service_env(redis_url(14), tmp_path / "store", tree["root"])
    env["ONNXCAM_ALLOWED_ROOTS"] += ":s3://onnxcam-in/ok"
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=moto_s3)
    settings = load_settings(**{k[8:].lower(): v for k, v in env.items()
                                if k.startswith("ONNXCAM_")})
    store = Store(settings.store_url)
    sha = store.put_bundle(bundle)
    cases = attacks(tree, store, listener.port)
    cases["s3, listed"] = (ImageRef("s3 ok", uri="s3://onnxcam-in/ok/good.png"), "ok")
    cases["s3, bucket listed elsewhere"] = (
        ImageRef("s3 other", uri="s3://onnxcam-in/other/good.png"), "forbidden_path")
    canary, control = untouched(tree["outside"] / "canary"), untouched(tree["outside"] / "control")
    dialled = listener.connections  # the module's listener: earlier tests dial it on purpose
    worker = start_worker("sources", env, tmp_path)
    try:
        worker.wait_ready()
        app = _app(settings)
        started = time.monotonic()
        spec = JobSpec("job-attacks", sha, [ref for ref, _ in cases.values()])
        send(app, spec, store)
        records = Job([spec.job_id], settings).wait(timeout=60)
        took = time.monotonic() - started
        codes = {name: (r.get("error") or {}).get("code", "ok")
                 for name, r in zip(cases, records)}
        assert codes == {name: code for name, (_, code) in cases.items()}
        after = JobSpec("job-after", sha, [ImageRef("good", path=str(tree["root"] / "good.png"))])
        send(app, after, store)
        assert Job([after.job_id], settings).wait(timeout=30)[0]["status"] == "ok"
        assert worker.process.poll() is None
    finally:
        worker.stop()
    assert listener.connections == dialled
    assert took < 30  # no retries: the closed port once cost 7 tries over 96 s
    assert "Retry in" not in worker.text() and "Traceback" not in worker.text()
    control.read_bytes()
    if was_read(control):
        assert not was_read(canary)
