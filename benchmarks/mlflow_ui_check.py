"""What a reviewer sees in MLflow, checked in a real browser (headless Chromium driven by Selenium).

It fills a fresh store with what `ray-kd` makes (a digits teacher, a KD run from it, a 3-trial sweep), starts
`mlflow ui` on loopback on a free port, opens the links the run and the sweep printed, and checks each page:
the Model training view (not GenAI), the run's name and description, and on the KD run's Model metrics tab
the accuracy chart leading, with no progress counters. The same link without its view parameter is opened
too, and must land in GenAI: the parameter is what opens training.

    python benchmarks/mlflow_ui_check.py [--out DIR] [--screenshots docs]

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`); nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["optim.epochs=3", "optim.milestones=[2]", "tracking.log_every_steps=4",
        "tracking.system_metrics_interval=0"]
RUN_NAME, SWEEP_NAME = "kd-digits", "lr-digits"
GENAI_ONLY = ("Evaluation runs", "Agent versions")
"""Side-bar entries of the GenAI view that the Model training view does not have."""
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400")


class Tee(io.TextIOBase):
    """stdout as it was, and a copy: the links are read from what the commands printed."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def printed_link(text: str) -> str:
    """The last run link a command printed (`ray_kd.tracking.ui_hint`)."""
    links = re.findall(r"the run in MLflow: (\S+)", text)
    if not links:
        raise AssertionError(f"no run link in the output:\n{text[-2000:]}")
    return links[-1]


def make_store(root: Path) -> dict:
    """A teacher, a KD run and a 3-trial sweep in `root`/mlflow.db; their printed links and descriptions."""
    from ray_kd.config import load_config
    from ray_kd.run import train, train_teacher
    from ray_kd.tracking import client
    from tuning.space import SweepSpace
    from tuning.sweep import sweep

    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    out = [f"output_dir={root / 'runs'}"]
    local = ["runtime.executor=local"]
    teacher = train_teacher(load_config(REPO / "configs/digits_teacher.yaml", TINY + local + out),
                            root / "teacher.pt")["teacher_file"]
    with contextlib.redirect_stdout(Tee(sys.stdout)) as tee:
        kd = train(load_config(REPO / "configs/digits_kd.yaml", TINY + local + out + [
            f"teacher.checkpoint={teacher}", f"name={RUN_NAME}"]))
    run_link = printed_link(tee.copy.getvalue())
    space = SweepSpace.model_validate({"searcher": "grid", "scheduler": {"type": "none"},
                                       "params": {"optim.lr": {"type": "grid", "values": [0.01, 0.05, 0.2]}}})
    with contextlib.redirect_stdout(Tee(sys.stdout)) as tee:
        sweep(load_config(REPO / "configs/digits_dml.yaml", TINY + out + [f"name={SWEEP_NAME}"]), space)
    sweep_link = printed_link(tee.copy.getvalue())
    mlflow = client(uri)
    notes = {link: mlflow.get_run(link.split("/runs/")[1].split("?")[0]).data.tags["mlflow.note.content"]
             for link in (run_link, sweep_link)}
    assert kd["mlflow_run_id"] in run_link
    return {"uri": uri, "run": run_link, "sweep": sweep_link, "notes": notes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> str | None:
    """None when `url` answers 200, else what went wrong; straight to loopback, past any proxy in the env."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as answer:
            return None if answer.status == 200 else f"HTTP {answer.status}"
    except OSError as error:
        return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def mlflow_ui(uri: str, log: Path, tries: int = 3, wait_s: float = 90):
    """`mlflow ui` over `uri` on 127.0.0.1 and a free port, until it answers; yields its base URL.

    A server that never answers (its port taken between our pick and its bind, say) is stopped and started
    again on another port, up to `tries` times; the last error and the server's log are in the exception."""
    for attempt in range(1, tries + 1):
        port = free_port()
        with log.open("a") as out:
            out.write(f"--- start {attempt} of {tries} on port {port}\n")
            out.flush()
            server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + wait_s
        error = answers(f"{base}/health")
        while error and server.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            error = answers(f"{base}/health")
        if error is None:
            break
        stop(server)
        if attempt == tries:
            raise RuntimeError(f"mlflow ui did not answer on {base}/health ({error}):\n{log.read_text()[-2000:]}")
    try:
        yield base
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """uvicorn and its worker: the process group it was started in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, 15)
    server.wait(timeout=60)


@contextlib.contextmanager
def browser(profile: Path):
    """Headless Chromium with a fresh profile (no view remembered from an earlier visit)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("mlflow_ui_check: needs chromium and chromedriver on PATH (Debian: apt-get install "
                         "chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield session
    finally:
        session.quit()


def text_once(session, *wanted: str, timeout: float = 120) -> str:
    """The page's visible text (whitespace collapsed) once it holds every `wanted` string."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        text = " ".join(driver.find_element(By.TAG_NAME, "body").text.split())
        return text if all(w in text for w in wanted) else False

    try:
        return WebDriverWait(session, timeout, poll_frequency=0.5).until(ready)
    except Exception:
        from selenium.webdriver.common.by import By

        shown = " ".join(session.find_element(By.TAG_NAME, "body").text.split())
        raise AssertionError(f"{session.current_url} never showed {wanted}; it shows: {shown[:3000]}") from None


def plain(markdown: str) -> str:
    """A description as the page renders it: no markdown emphasis or code marks."""
    return " ".join(markdown.replace("**", "").replace("`", "").split())


def training_view(session, text: str) -> None:
    """The Model training view: a "Runs" entry, none of GenAI's, and the URL keeps the view."""
    from ray_kd.tracking import TRAINING_VIEW

    assert not [g for g in GENAI_ONLY if g in text], (session.current_url, text[:1500])
    assert TRAINING_VIEW in session.current_url, session.current_url


def close_assistant(session) -> None:
    """The assistant panel off the screenshot (the page is the same without it)."""
    from selenium.webdriver.common.by import By

    for button in session.find_elements(By.CSS_SELECTOR, "button[data-component-id^='mlflow.assistant']"):
        if button.get_attribute("aria-label") in ("Close", "Close assistant", "close"):
            button.click()
            return


def screenshot(session, folder: Path | None, name: str) -> None:
    """`folder`/`name`: a PNG of the window without the assistant panel, in at most 256 colours (small enough to
    commit); nothing when no folder is asked for."""
    from PIL import Image

    if folder is None:
        return
    close_assistant(session)
    time.sleep(1)  # the panel's closing animation
    png = session.get_screenshot_as_png()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(folder / name, optimize=True)


def check(store: dict, base: str, profile_root: Path, screenshots: Path | None) -> list[str]:
    """Every check on the pages; returns what was checked, a line each."""
    from selenium.webdriver.common.by import By

    done = []
    run_url = store["run"].replace("http://127.0.0.1:5000", base)  # the UI started here, not on 5000
    sweep_url = store["sweep"].replace("http://127.0.0.1:5000", base)

    with browser(profile_root / "bare") as session:  # the same link without the view parameter: GenAI
        session.get(run_url.split("?")[0])
        text = text_once(session, RUN_NAME, *GENAI_ONLY)
        done.append(f"without the parameter the run opens in GenAI ({', '.join(GENAI_ONLY)} shown)")

    with browser(profile_root / "review") as session:
        session.get(run_url)
        note = plain(store["notes"][store["run"]])
        text = text_once(session, RUN_NAME, note, "Model metrics")
        training_view(session, text)
        done.append(f"run link {run_url}: Model training view, name {RUN_NAME!r}, description {note!r}")
        screenshot(session, screenshots, "mlflow-run.png")

        session.find_element(By.XPATH, "//*[normalize-space(text())='Model metrics']").click()
        text = text_once(session, f"{RUN_NAME} (student_0/val_acc)", f"{RUN_NAME} (student_0/test_acc)")
        training_view(session, text)
        sections = re.findall(r"(\S+) \((\d+)\) Add chart", text)
        assert sections and sections[0][0] == "student_0", sections  # the role's curves lead
        assert [name for name, _ in sections].index("student_0/final") > 0, sections
        assert not [s for s, _ in sections if s.startswith("progress")] and "eta_s" not in text, sections
        done.append(f"Model metrics: sections {[s for s, _ in sections]}, val and test top-1 charts drawn")
        screenshot(session, screenshots, "mlflow-run-charts.png")

        session.get(sweep_url)
        note = plain(store["notes"][store["sweep"]])
        text = text_once(session, f"{SWEEP_NAME}-sweep", note)
        training_view(session, text)
        done.append(f"sweep link {sweep_url}: Model training view, name {SWEEP_NAME}-sweep, description {note!r}")
        screenshot(session, screenshots, "mlflow-sweep.png")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the store and runs (default: a temporary one)")
    parser.add_argument("--screenshots", type=Path,
                        help="write mlflow-run.png, mlflow-run-charts.png and mlflow-sweep.png here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    with contextlib.ExitStack() as stack:
        root = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflow-ui-check-")))
        root.mkdir(parents=True, exist_ok=True)
        store = make_store(root)
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
        base = stack.enter_context(mlflow_ui(store["uri"], root / "mlflow-ui.log"))
        for line in check(store, base, root / "chromium", args.screenshots):
            print(f"ok: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
