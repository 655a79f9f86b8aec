"""Build the vitserve image from scratch with Podman, run it, and check it serves.

What CI runs (through tests/test_image.py) and what a new user can run by hand:

    python deploy/image/smoke.py            # build, start, check /readyz, /classify, /metrics

The steps, each a workaround for something a plain ``podman build`` trips on:

* the base image is Debian made here with ``debootstrap`` from the mirror apt already uses,
  then ``podman import``-ed: no registry is needed, and it is named fully qualified
  (``localhost/...``), since Podman refuses short names;
* Podman runs with a containers.conf in the work dir: ``runtime = "runc"`` (crun fails on
  setrlimit and on hybrid cgroups) and ``default_ulimits`` within the host's hard limits;
* the build mounts the machine's CA bundle and its effective pip configuration (with the
  local indexes and files it names), so pip inside the build finds what pip outside does;
* ``--format docker``: the OCI format drops the Dockerfile's HEALTHCHECK;
* the container gets the offline Hugging Face cache read-only (``HF_HUB_OFFLINE=1``), so the
  default model's weights are pulled from it at start, never from the network.

The container is always removed; ``--remove-image`` also removes the image it built.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_IMAGE = "localhost/vitserve-base:bookworm"
IMAGE = "localhost/vitserve:smoke"
CONTAINER_PORT = 8000
HF_CACHE_IN_CONTAINER = "/srv/hf-cache"
# A photo DeiT-Tiny gets right (class 0 in timm's ImageNet order), with its label from
# the folder's labels.csv.
PHOTO = SHARED / "images" / "imagenet-dev" / "n01440764_tench.JPEG"
PIP_BUILD_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT")
REQUIRED_TOOLS = ("podman", "runc", "debootstrap")
ULIMIT_CAP = 16384


def log(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


class Podman:
    """``podman`` with this run's containers.conf and storage under the work dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "containers.conf"
        self.conf.write_text(containers_conf())
        self.root = ["--root", str(workdir / "storage"), "--runroot", str(workdir / "run")]

    def command(self, *args: str) -> list[str]:
        return ["podman", *self.root, *args]

    def run(self, *args: str, check: bool = True, capture: bool = False, **kw):
        env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        cmd = self.command(*args)
        if not capture:
            log("$ " + shlex.join(cmd))
        return subprocess.run(cmd, check=check, env=env, capture_output=capture, text=True, **kw)

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False, capture=True).returncode == 0


def containers_conf() -> str:
    """runc, and ulimits the runtime can set. Podman's defaults (nofile 1048576, nproc
    4194304) exceed many hosts' hard limits, and its helpers (conmon, runc) may run with
    lower ones than this shell (here: nproc 32768, nofile under 20000), so stay well under."""
    limits = []
    for name, kind in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(kind)[1]
        value = ULIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, ULIMIT_CAP)
        limits.append(f'"{name}={value}:{value}"')
    return (
        "# Written by deploy/image/smoke.py\n"
        "[containers]\n"
        f"default_ulimits = [{', '.join(limits)}]\n"
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )


# ---- the base image ------------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 .sources or a sources.list line)."""
    apt = Path("/etc/apt")
    for sources in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and "security" not in uris.group(1):
                return uris.group(1)
    for listing in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if listing.is_file():
            for line in listing.read_text().splitlines():
                parts = line.split()
                if parts[:1] == ["deb"] and "security" not in line:
                    return next(p for p in parts[1:] if not p.startswith("["))
    return "http://deb.debian.org/debian"


def debian_suite() -> str:
    release = Path("/etc/os-release").read_text()
    found = re.search(r"^VERSION_CODENAME=(\w+)", release, re.M)
    return found.group(1) if found else "bookworm"


def make_base_image(podman: Podman, name: str) -> None:
    """A minimal Debian with python3-venv, from debootstrap, imported as ``name``."""
    rootfs = podman.workdir / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror, suite = apt_mirror(), debian_suite()
    log(f"debootstrap {suite} from {mirror}")
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates,passwd",
            suite,
            str(rootfs),
            mirror,
        ],
        check=True,
    )
    subprocess.run(["chroot", str(rootfs), "apt-get", "clean"], check=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman.run("import", "--change", 'CMD ["/bin/bash"]', "-", name, stdin=tar.stdout)
    if tar.wait() != 0:
        raise RuntimeError("tar of the debootstrap root failed")
    shutil.rmtree(rootfs)


# ---- the build -----------------------------------------------------------------------------


def effective_pip_config() -> dict[str, str]:
    """``key -> value`` of pip's configuration as pip here sees it: files, then env."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    files, env = {}, {}
    for line in listed.splitlines():
        found = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
        if not found:
            continue
        section, key, value = found.groups()
        if section == ":env:":
            env[key] = value
        elif section in ("global", "install", "download"):
            files[key] = value
    return {**files, **env}


def local_paths(values: list[str]) -> set[Path]:
    """The local files and folders pip's settings name (``file://`` URLs or absolute paths);
    a PEP 503 ``.../simple`` index brings its parent, where its relative links point."""
    paths = set()
    for token in " ".join(values).split():
        path = Path(token.removeprefix("file://")) if token.startswith(("file://", "/")) else None
        if path is None or not path.exists():
            continue
        paths.add(path.parent if path.name == "simple" else path)
    return paths


def pip_mounts(workdir: Path) -> list[str]:
    """``-v`` options giving the build the CA bundle and pip configuration of this machine."""
    config = effective_pip_config()
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in config.items()))
    volumes = [f"{conf}:/etc/pip.conf:ro"]
    if CA_BUNDLE.is_file():
        volumes.append(f"{CA_BUNDLE}:{CA_BUNDLE}:ro")
    for path in sorted(local_paths(list(config.values())) - {CA_BUNDLE}):
        volumes.append(f"{path}:{path}:ro")
    return [option for volume in volumes for option in ("-v", volume)]


def build(podman: Podman, image: str, base: str) -> float:
    config = effective_pip_config()
    args = ["--build-arg", f"BASE_IMAGE={base}"]
    for name in PIP_BUILD_ARGS:  # the Dockerfile's ARGs override the mounted config: align
        value = config.get(name.removeprefix("PIP_").lower().replace("_", "-"))
        if value:
            args += ["--build-arg", f"{name}={value}"]
    start = time.monotonic()
    podman.run(
        "build",
        "--format",
        "docker",
        "--pull=never",
        *pip_mounts(podman.workdir),
        *args,
        "-t",
        image,
        str(REPO),
    )
    return time.monotonic() - start


# ---- the checks ----------------------------------------------------------------------------


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(base: str, podman: Podman, container: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = podman.run("inspect", "--format", "{{.State.Running}}", container, capture=True)
        if state.stdout.strip() != "true":
            raise RuntimeError("the container exited before it was ready")
        try:
            status, body = get(f"{base}/readyz")
        except OSError:
            status, body = 0, b""
        if status == 200:
            return json.loads(body)
        time.sleep(2)
    raise TimeoutError(f"/readyz did not answer 200 within {timeout_s:.0f} s")


def expected_class(photo: Path) -> int:
    with (photo.parent / "labels.csv").open() as f:
        return next(int(r["class_index"]) for r in csv.DictReader(f) if r["file"] == photo.name)


def classify(base: str, photo: Path) -> dict:
    request = urllib.request.Request(
        f"{base}/classify?top_k=3",
        data=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def check_service(base: str, photo: Path) -> dict[str, float]:
    """A real photo classified right, then the metrics counting it: the figures measured."""
    want = expected_class(photo)
    classify(base, photo)  # the first request of a fresh process is not the one timed
    start = time.perf_counter()
    answer = classify(base, photo)
    latency_ms = (time.perf_counter() - start) * 1000
    (result,) = answer["results"]
    top1 = result["predictions"][0]
    if top1["index"] != want:
        raise AssertionError(f"{photo.name}: top-1 {top1} but the label is class {want}")
    log(f"/classify {photo.name}: {top1['label']} ({top1['score']:.3f}) in {latency_ms:.0f} ms")
    status, body = get(f"{base}/metrics")
    text = body.decode()
    images = re.search(rf'^vitserve_images_total{{model="{answer["model"]}"}} (\S+)$', text, re.M)
    if status != 200 or not images or float(images.group(1)) < 2:
        raise AssertionError(f"/metrics ({status}) does not count the two images:\n{text[:2000]}")
    log(f"/metrics: vitserve_images_total = {images.group(1)}")
    return {"classify_ms": latency_ms, "score": top1["score"]}


def serve_and_check(podman: Podman, image: str, hf_cache: Path, photo: Path, timeout_s: float):
    container = f"vitserve-smoke-{uuid.uuid4().hex[:8]}"
    host_port = free_port()
    base = f"http://127.0.0.1:{host_port}"
    try:
        podman.run(
            "run",
            "-d",
            "--name",
            container,
            "-p",
            f"127.0.0.1:{host_port}:{CONTAINER_PORT}",
            "-v",
            f"{hf_cache}:{HF_CACHE_IN_CONTAINER}:ro",
            "-e",
            f"HF_HUB_CACHE={HF_CACHE_IN_CONTAINER}",
            "-e",
            "HF_HUB_OFFLINE=1",
            "-e",
            "VITSERVE_DEVICE=cpu",
            image,
        )
        ready = wait_ready(base, podman, container, timeout_s)
        log(f"/readyz: {ready}")
        return check_service(base, photo)
    except BaseException:
        podman.run("logs", "--tail", "60", container, check=False)
        raise
    finally:
        podman.run("rm", "--force", "--time", "10", container, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/vitserve-image"),
        help="Podman's storage and config, the debootstrap root (default: %(default)s).",
    )
    parser.add_argument("--image", default=IMAGE, help="Tag of the image built.")
    parser.add_argument("--base", default=BASE_IMAGE, help="Base image; made if absent.")
    parser.add_argument("--hf-cache", type=Path, default=SHARED / "hf-cache")
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--remove-image", action="store_true", help="rmi the image at the end.")
    args = parser.parse_args(argv)
    if missing := missing_tools():
        parser.error(
            f"missing {', '.join(missing)} (Debian: apt-get install podman runc debootstrap)"
        )
    podman = Podman(args.workdir)
    if not podman.image_exists(args.base):
        make_base_image(podman, args.base)
    build_s = build(podman, args.image, args.base)
    log(f"built {args.image} in {build_s:.0f} s")
    try:
        figures = serve_and_check(
            podman, args.image, args.hf_cache.resolve(), args.photo, args.ready_timeout
        )
    finally:
        size = podman.run("image", "inspect", "--format", "{{.Size}}", args.image, capture=True)
        log(f"image size {int(size.stdout.strip()) / 1e9:.2f} GB")
        if args.remove_image:
            podman.run("rmi", "--force", args.image, check=False)
    log(f"OK: build {build_s:.0f} s, /classify {figures['classify_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
