"""Media fetching treats task URLs as hostile: only the configured Label Studio is contacted,
with limits on time, size and pixels. A real HTTP server on 127.0.0.1 plays Label Studio, and a
second one an address a task might try to reach."""

from __future__ import annotations

import dataclasses
import http.server
import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from xmem_label.backend import formats, media, propagation
from xmem_label.backend.settings import BackendSettings
from xmem_label.backend.studio import LabelStudio
from xmem_label.model import InputError, load_engine, pass_cache, read_label_mask
from xmem_label.model.keyframes import Keyframes

DATA = Path(__file__).resolve().parents[1] / "data" / "vos"


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


class Server:
    """A threaded HTTP server on 127.0.0.1 whose routes are (status, headers, body or a
    generator of chunks); it records every path asked and the Authorization header."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Authorization")))
                status, headers, body = outer.routes.get(self.path.split("?")[0], (404, {}, b"no"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()  # a short poll: shutdown() waits for it

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def trickle():
    for _ in range(100):
        yield b"x"
        time.sleep(0.1)


@pytest.fixture
def elsewhere():
    server = Server({"/secret": (200, {}, b"internal")})
    yield server
    server.close()


@pytest.fixture
def studio(elsewhere):
    server = Server(
        {
            "/data/upload/1/frame.png": (200, {}, png(64, 48)),
            "/data/upload/1/huge.png": (200, {}, png(5000, 4000)),
            "/data/upload/1/big.bin": (200, {}, b"x" * 5000),
            "/data/upload/1/slow.png": (200, {}, trickle()),
            "/data/upload/1/moved.png": (302, {"Location": f"{elsewhere.url}/secret"}, b""),
            "/tasks/7/resolve/": (
                303,
                {"Location": "http://169.254.169.254/latest/meta-data"},
                b"",
            ),
        }
    )
    yield server
    server.close()


@pytest.fixture
def settings(studio, tmp_path):
    base = BackendSettings.from_environment(
        {
            "LABEL_STUDIO_URL": studio.url,
            "LABEL_STUDIO_API_KEY": "token123",
            "MODEL_DIR": str(tmp_path),
            "LOCAL_FILES_DOCUMENT_ROOT": str(DATA),
        }
    )
    return dataclasses.replace(
        base, max_download_bytes=4000, download_timeout=1.0, max_frame_pixels=4096 * 4096
    )


def fetch(url, settings, tmp_path, task_id=7):
    return media.fetch(
        url,
        task_id,
        tmp_path / "out",
        "frame 0 of task 7",
        settings,
        lambda: {"Authorization": "Token token123"},
    )


def test_a_label_studio_path_is_fetched_with_the_token(settings, studio, tmp_path):
    path = fetch("/data/upload/1/frame.png", settings, tmp_path)
    assert media.image_size(path, "frame 0", settings) == (64, 48)
    assert studio.requests == [("/data/upload/1/frame.png", "Token token123")]
    assert fetch(f"{studio.url}/data/upload/1/frame.png", settings, tmp_path).exists()


@pytest.mark.parametrize(
    "url",
    [
        "{elsewhere}/secret",  # another port on loopback
        "http://169.254.169.254/latest/meta-data",  # link-local metadata service
        "http://localhost:{port}/data/upload/1/frame.png",  # same port, another host name
        "file:///etc/passwd",
        "//evil.example/x.png",
        "ftp://127.0.0.1/x",
        "",
        12,
    ],
)
def test_urls_off_label_studio_are_refused_without_connecting(
    url, settings, studio, elsewhere, tmp_path
):
    if isinstance(url, str):
        url = url.format(elsewhere=elsewhere.url, port=studio.url.rsplit(":", 1)[1])
    with pytest.raises(InputError) as error:
        fetch(url, settings, tmp_path)
    assert elsewhere.requests == [] and studio.requests == []
    assert "127.0.0.1" not in str(error.value) and not (tmp_path / "out").exists()


def test_redirects_away_from_label_studio_are_not_followed(settings, elsewhere, tmp_path):
    with pytest.raises(InputError, match="redirected"):
        fetch("/data/upload/1/moved.png", settings, tmp_path)
    assert elsewhere.requests == []


def test_a_storage_redirect_to_a_private_address_is_refused(settings, tmp_path):
    with pytest.raises(InputError, match="private address"):
        fetch("s3://bucket/frame.png", settings, tmp_path)


def test_size_time_and_pixel_limits(settings, tmp_path):
    with pytest.raises(InputError, match="5000 bytes, more than the backend's limit"):
        fetch("/data/upload/1/big.bin", settings, tmp_path)
    started = time.monotonic()
    with pytest.raises(media.MediaUnavailable, match="not received within 1 s"):
        fetch("/data/upload/1/slow.png", settings, tmp_path)
    assert time.monotonic() - started < 3 and not (tmp_path / "out").exists()
    roomy = dataclasses.replace(settings, max_download_bytes=1 << 20)
    huge = fetch("/data/upload/1/huge.png", roomy, tmp_path)
    with pytest.raises(InputError, match="5000x4000: it has more pixels than the backend's limit"):
        media.image_size(huge, "frame 0", dataclasses.replace(settings, max_frame_pixels=10**7))


def test_local_files_stay_under_the_document_root(settings, tmp_path):
    frame = fetch("/data/local-files/?d=chair/frames/frame_000000.jpg", settings, tmp_path)
    assert frame == DATA / "chair" / "frames" / "frame_000000.jpg"
    for escape in ("../../../../etc/passwd", "/etc/passwd", "chair/../../test_cli.py"):
        with pytest.raises(InputError, match="LOCAL_FILES_DOCUMENT_ROOT"):
            fetch(f"/data/local-files/?d={escape}", settings, tmp_path)


def chair_task(server: Server, tmp_path: Path):
    """A backend on `server` as Label Studio (its MODEL_DIR in tmp_path), and an image-sequence
    task's keyframes and config: the chair's ground truth on frame 0."""
    settings = BackendSettings.from_environment(
        {
            "LABEL_STUDIO_URL": server.url,
            "LABEL_STUDIO_API_KEY": "token123",
            "MODEL_DIR": str(tmp_path),
        }
    )
    mask = read_label_mask(DATA / "chair" / "masks" / "frame_000000.png") == 1
    given = Keyframes()
    given.add(0, 1, mask)
    keyframes = formats.BrushKeyframes(
        labels={1: "Chair"}, given=given, regions={}, size=(mask.shape[1], mask.shape[0])
    )
    config = formats.SequenceConfig(
        brush_name="mask", image_name="image", frames_key="frames", labels=("Chair",),
        prompt_names=(),
    )  # fmt: skip
    return LabelStudio(settings), keyframes, config


def test_a_tasks_frames_are_downloaded_once_and_kept_with_its_passes(tmp_path):
    """A correction's job reads the frames the task's first job downloaded (they sit in the
    task's pass-cache folder); a task whose frame URLs change is downloaded again."""
    frames = sorted((DATA / "chair" / "frames").glob("*.jpg"))[:4]
    server = Server({f"/data/upload/1/{p.name}": (200, {}, p.read_bytes()) for p in frames})
    try:
        label_studio, keyframes, config = chair_task(server, tmp_path)
        engine = load_engine("flow")
        urls = [f"/data/upload/1/{p.name}" for p in frames]

        def run(frame_urls):
            request = propagation.SequenceRequest(7, frame_urls, keyframes)
            return propagation.run_sequence(request, config, engine, label_studio, "v")

        first = run(urls)
        assert len(server.requests) == 4
        again = run(urls)
        assert len(server.requests) == 4  # nothing fetched
        assert again.prediction == first.prediction
        folder = propagation.task_folder(label_studio, 7, urls)
        assert sorted(p.name for p in (folder / "media").iterdir()) == [
            f"{i:06d}" for i in range(4)
        ]
        run(urls[:3] + urls[:1])
        assert len(server.requests) == 8
        # an id that is not an integer (a hostile /predict body) never names a folder
        hostile = propagation.task_folder(label_studio, "../../../elsewhere", urls)
        assert hostile.parent == label_studio.settings.pass_cache_dir and "/" not in hostile.name
    finally:
        server.close()


class SteppingEngine:
    """The flow engine, setting `stepped` once its tracker has worked on a second frame."""

    name = "flow"

    def __init__(self):
        self.engine = load_engine("flow")
        self.stepped = threading.Event()

    def describe(self):
        return self.engine.describe()

    def new_tracker(self, num_frames):
        tracker = self.engine.new_tracker(num_frames)
        step, steps = tracker.step, []

        def counting_step(frame, prompt=None, *, last=False):
            probs = step(frame, prompt, last=last)
            steps.append(1)
            if len(steps) == 2:
                self.stepped.set()
            return probs

        tracker.step = counting_step
        return tracker


def test_propagation_starts_while_later_frames_are_still_downloading(tmp_path):
    """The last frame's download is held until the engine has worked on frames 0 and 1: the
    job can only finish if propagation overlaps the download. A frame of another size, arriving
    late, still fails the job with the reason."""
    frames = sorted((DATA / "chair" / "frames").glob("*.jpg"))[:4]
    engine = SteppingEngine()
    held: list[bool] = []

    def after_two_steps(data: bytes):
        held.append(engine.stepped.wait(10))
        yield data

    routes = {f"/data/upload/1/{p.name}": (200, {}, p.read_bytes()) for p in frames[:3]}
    routes[f"/data/upload/1/{frames[3].name}"] = (200, {}, after_two_steps(frames[3].read_bytes()))
    odd = io.BytesIO()
    Image.open(frames[3]).resize((64, 48)).save(odd, "JPEG")
    routes["/data/upload/1/odd.jpg"] = (200, {}, odd.getvalue())
    server = Server(routes)
    try:
        label_studio, keyframes, config = chair_task(server, tmp_path)
        urls = [f"/data/upload/1/{p.name}" for p in frames]
        request = propagation.SequenceRequest(7, urls, keyframes)
        outcome = propagation.run_sequence(request, config, engine, label_studio, "v")
        assert held == [True]
        assert {r["item_index"] for r in outcome.prediction["result"]} == {0, 1, 2, 3}

        request = propagation.SequenceRequest(8, [*urls[:3], "/data/upload/1/odd.jpg"], keyframes)
        with pytest.raises(InputError, match="differ in size: frame 3 is 64x48"):
            propagation.run_sequence(request, config, load_engine("flow"), label_studio, "v")
    finally:
        server.close()


def test_frames_are_fetched_in_the_order_the_session_reads_them(tmp_path):
    """With the keyframe on the last frame the session's first pass runs backward from it: the
    frames that pass reads are fetched next, not after the rest of the task in task order (the
    engine would wait for the whole task). Every frame takes Label Studio 0.5 s, so the fetches
    already under way when the pass starts are the first frames in task order."""
    files = sorted((DATA / "chair" / "frames").glob("*.jpg"))
    count = 12

    def slow(data: bytes):
        time.sleep(0.5)
        yield data

    server = Server(
        {
            f"/data/upload/1/{index}.jpg": (200, {}, slow(files[index % len(files)].read_bytes()))
            for index in range(count)
        }
    )
    try:
        label_studio, keyframes, config = chair_task(server, tmp_path)
        given = Keyframes()
        given.add(count - 1, 1, keyframes.given.masks[0][1])
        last = dataclasses.replace(keyframes, given=given)
        urls = [f"/data/upload/1/{index}.jpg" for index in range(count)]
        request = propagation.SequenceRequest(7, urls, last)
        propagation.run_sequence(request, config, load_engine("flow"), label_studio, "v")
        order = [int(path.rsplit("/", 1)[1].split(".")[0]) for path, _ in server.requests]
        assert sorted(order) == list(range(count))
        # Frame 0 (its size is the task's), the fetches under way when the pass started (frames
        # 1 to 4), then the pass's frames from the last down: in task order, the last frame
        # would come last. (Fetches side by side may reach the server in any order.)
        assert count - 1 in order[: 1 + 2 * propagation.DOWNLOAD_THREADS]
        assert set(order[-3:]) == {5, 6, 7}
    finally:
        server.close()


def test_the_pass_cache_is_trimmed_to_its_cap_after_a_job(tmp_path, monkeypatch):
    """After a job, in a thread beside the storing of its prediction, the least recently used
    task folders go until the rest fits the cap (XMEM_LABEL_PASS_CACHE_GB); the job's own, the
    most recent, stays."""
    frames = sorted((DATA / "chair" / "frames").glob("*.jpg"))[:3]
    server = Server({f"/data/upload/1/{p.name}": (200, {}, p.read_bytes()) for p in frames})
    trims: list[threading.Thread] = []
    start_trim = propagation.evict_in_background
    monkeypatch.setattr(
        propagation, "evict_in_background", lambda settings: trims.append(start_trim(settings))
    )
    try:
        label_studio, keyframes, config = chair_task(server, tmp_path)
        engine = load_engine("flow")
        urls = [f"/data/upload/1/{p.name}" for p in frames]
        propagation.run_sequence(
            propagation.SequenceRequest(7, urls, keyframes), config, engine, label_studio, "v"
        )
        trims.pop().join()
        first = propagation.task_folder(label_studio, 7, urls)
        one_task = pass_cache.folder_bytes(first)
        capped = dataclasses.replace(label_studio.settings, pass_cache_bytes=one_task * 3 // 2)
        label_studio = LabelStudio(capped)
        time.sleep(0.01)  # the second task's folder is the more recent one
        propagation.run_sequence(
            propagation.SequenceRequest(8, urls, keyframes), config, engine, label_studio, "v"
        )
        trims.pop().join()
        assert not first.exists()
        assert propagation.task_folder(label_studio, 8, urls).is_dir()
    finally:
        server.close()
