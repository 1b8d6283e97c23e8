"""An aarch64 sysroot for running the device runner under qemu user-mode emulation.

Debian bookworm arm64 packages (Python 3.11 and the C libraries it and onnxruntime load) are
fetched with `apt-get download` against a private apt state (the host's apt lists and cache are not
touched) and unpacked with `dpkg -x` into one folder; numpy and onnxruntime come as hash-pinned
manylinux aarch64 wheels, unzipped beside it. The result lives in the user's edgekd cache under a
name derived from the pins, with a manifest.json that records every version, so a second build is a
no-op. Build it with `python -m edgekd.bench.sysroot [--force]`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeKDError, RuntimeMissingError, StageError
from ..runs import cache_dir, write_json

FORMAT = 1
QEMU = "qemu-aarch64-static"
DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_SOURCES = (("http://deb.debian.org/debian", DEBIAN_SUITE),
                  ("http://deb.debian.org/debian", f"{DEBIAN_SUITE}-updates"),
                  ("http://deb.debian.org/debian-security", f"{DEBIAN_SUITE}-security"))
# Python 3.11 and what it, numpy and onnxruntime load; versions float with the suite's updates and
# are recorded in the manifest.
DEBIAN_PACKAGES = ("libc6", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libssl3",
                   "zlib1g", "libffi8", "libexpat1", "libbz2-1.0", "liblzma5", "libgcc-s1", "libstdc++6",
                   "libsqlite3-0", "libuuid1", "libncursesw6", "libtinfo6", "libcrypt1", "libgomp1")
PYTHON_VERSION = "3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# onnxruntime 1.24.1 is the newest aarch64 build that runs under qemu 7.2 (Debian 12's): 1.31.1
# dies with SIGSEGV at import. numpy 2.2.6 is within onnxruntime 1.24.1's numpy>=1.21.6.
WHEELS = {
    "numpy": ("2.2.6", "b64d8d4d17135e00c8e346e0a738deb17e754230d7e0810ac5012750bbd85a5a"),
    "onnxruntime": ("1.24.1", "86bc43e922b1f581b3de26a3dc402149c70e5542fceb5bec6b3a85542dbeb164"),
}
BUILD_COMMAND = "python -m edgekd.bench.sysroot"
_SMOKE = ("import json, platform, sys, numpy, onnxruntime\n"
          "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
          "  'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__,\n"
          "  'providers': onnxruntime.get_available_providers()}))\n")
_SMOKE_CPU = "cortex-a76"
_TIMEOUT_S = 900


@dataclass(frozen=True)
class Sysroot:
    """A built sysroot: `rootfs` (the unpacked Debian packages), `site_packages` (the wheels) and
    the manifest recorded when it was built."""

    path: Path
    manifest: dict

    @property
    def rootfs(self) -> Path:
        """The folder qemu is given with -L."""
        return self.path / "rootfs"

    @property
    def site_packages(self) -> Path:
        """numpy and onnxruntime, unzipped from their aarch64 wheels."""
        return self.path / "site-packages"

    @property
    def python(self) -> Path:
        """The aarch64 Python interpreter inside the rootfs."""
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def command(self, args: list[str], cpu: str) -> list[str]:
        """The host command that runs the aarch64 Python with `args` on an emulated `cpu`."""
        return [find_qemu(), "-cpu", cpu, "-L", str(self.rootfs), str(self.python), *args]

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for the emulated Python: nothing of the host's Python leaks in."""
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(self.site_packages),
               "PYTHONNOUSERSITE": "1", "HOME": os.environ.get("HOME", "/tmp")}
        env.update(extra or {})
        return env


def pins() -> dict:
    """Everything a sysroot is built from; its hash names the cache folder."""
    return {"format": FORMAT, "python": PYTHON_VERSION,
            "debian": {"suite": DEBIAN_SUITE, "sources": [f"{u} {s} main" for u, s in DEBIAN_SOURCES],
                       "packages": sorted(DEBIAN_PACKAGES)},
            "wheels": {name: {"version": v, "sha256": h} for name, (v, h) in sorted(WHEELS.items())},
            "wheel_platforms": list(WHEEL_PLATFORMS)}


def pins_key() -> str:
    """A short content hash of `pins()`."""
    return hashlib.sha256(json.dumps(pins(), sort_keys=True).encode()).hexdigest()[:12]


def sysroot_dir() -> Path:
    """Where the sysroot for the current pins lives: <edgekd cache>/arm64-sysroot-<hash>."""
    return cache_dir() / f"arm64-sysroot-{pins_key()}"


def find_qemu() -> str:
    """The path of qemu-aarch64-static, or RuntimeMissingError saying how to install it."""
    found = shutil.which(QEMU)
    if found is None:
        raise RuntimeMissingError(f"{QEMU} is not installed on this host: ARM checks run the aarch64 runtime under "
                                  "it (Debian/Ubuntu: apt-get install qemu-user-static; or run tools/system_deps.sh)")
    return found


def qemu_version() -> str:
    """`qemu-aarch64 version X` as the emulator reports it."""
    out = _run([find_qemu(), "--version"], "qemu --version", timeout=30).stdout
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def load_sysroot() -> Sysroot:
    """The sysroot built for the current pins; RuntimeMissingError naming the build command when it
    has not been built (or its build did not finish)."""
    find_qemu()
    path = sysroot_dir()
    manifest = _read_manifest(path)
    if manifest is None:
        raise RuntimeMissingError(f"the aarch64 sysroot is not built (expected in {path}); build it once with "
                                  f"`{BUILD_COMMAND}` (downloads about 40 MB from Debian and PyPI)")
    return Sysroot(path, manifest)


def build_sysroot(force: bool = False, log: Callable[[str], None] | None = None) -> Sysroot:
    """Build the sysroot for the current pins, or return the one already built (a no-op) unless
    `force`. Raises RuntimeMissingError when qemu, apt-get, dpkg, pip or the Debian keyring is
    missing, StageError when a download, an unpack or the emulated import check fails."""
    say = log or (lambda _msg: None)
    path = sysroot_dir()
    manifest = _read_manifest(path)
    if manifest is not None and not force:
        find_qemu()
        say(f"up to date: {path}")
        return Sysroot(path, manifest)
    _check_tools()
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        built = work / "sysroot"
        packages = _debian_packages(work, built / "rootfs", say)
        wheels = _wheels(work, built / "site-packages", say)
        say("checking the aarch64 Python imports numpy and onnxruntime under emulation")
        partial = Sysroot(built, {})
        verified = _smoke(partial)
        manifest = {"format": FORMAT, "key": pins_key(), "pins": pins(),
                    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "qemu": qemu_version(), "debian_packages": packages, "wheels": wheels, "verified": verified}
        write_json(built / "manifest.json", manifest)
        if path.exists():
            shutil.rmtree(path)
        try:
            os.rename(built, path)
        except OSError:
            if _read_manifest(path) is None:  # not a concurrent build that finished first
                raise
        say(f"built: {path}")
        return Sysroot(path, _read_manifest(path) or manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("key") == pins_key() else None


def _check_tools() -> None:
    find_qemu()
    for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("dpkg", "dpkg")):
        if shutil.which(tool) is None:
            raise RuntimeMissingError(f"{tool} is not installed on this host: the aarch64 sysroot is assembled from "
                                      f"Debian packages with apt-get download and dpkg -x (package {package})")
    if not Path(DEBIAN_KEYRING).is_file():
        raise RuntimeMissingError(f"{DEBIAN_KEYRING} is missing: apt needs Debian's archive key to check the "
                                  "arm64 packages (apt-get install debian-archive-keyring)")
    if importlib.util.find_spec("pip") is None:
        raise RuntimeMissingError(f"pip is not available for {sys.executable}: the aarch64 numpy and onnxruntime "
                                  "wheels are fetched with pip download")


def _run(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: int = _TIMEOUT_S,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StageError(f"arm64 sysroot: {what} did not finish within {timeout} s") from None
    except OSError as e:
        raise StageError(f"arm64 sysroot: {what} could not start: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines
        detail = "; ".join(errors[-3:])[:600] or f"exit code {proc.returncode}"
        raise StageError(f"arm64 sysroot: {what} failed: {detail}")
    return proc


def _apt_options(state: Path) -> list[str]:
    """apt options that point every list, cache and status file into `state`."""
    for sub in ("lists/partial", "cache/archives/partial", "parts", "preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    lines = [f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {uri} {suite} main" for uri, suite in DEBIAN_SOURCES]
    (state / "sources.list").write_text("\n".join(lines) + "\n")
    options = {"APT::Architecture": "arm64", "APT::Architectures": "arm64",
               "Dir::Etc::SourceList": state / "sources.list", "Dir::Etc::SourceParts": state / "parts",
               "Dir::Etc::Preferences": state / "preferences", "Dir::Etc::PreferencesParts": state / "preferences.d",
               "Dir::State::Lists": state / "lists", "Dir::State::status": state / "status",
               "Dir::Cache": state / "cache", "Debug::NoLocking": "1", "APT::Sandbox::User": "root",
               "Acquire::Languages": "none"}
    if os.geteuid() != 0:
        del options["APT::Sandbox::User"]
    return [f"-o{k}={v}" for k, v in options.items()]


def _debian_packages(work: Path, rootfs: Path, say: Callable[[str], None]) -> dict:
    state, debs = work / "apt", work / "debs"
    debs.mkdir(parents=True)
    rootfs.mkdir(parents=True)
    options = _apt_options(state)
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    say(f"apt-get update (arm64, Debian {DEBIAN_SUITE}, private lists)")
    _run(["apt-get", *options, "update"], "apt-get update for arm64", env=env)
    say(f"apt-get download: {len(DEBIAN_PACKAGES)} arm64 packages")
    _run(["apt-get", *options, "download", *DEBIAN_PACKAGES], "apt-get download of the arm64 packages",
         cwd=debs, env=env)
    recorded: dict = {}
    for deb in sorted(debs.glob("*.deb")):
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"], f"dpkg-deb -f {deb.name}")
        info = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        _run(["dpkg", "-x", str(deb), str(rootfs)], f"dpkg -x {deb.name}")
        recorded[info.get("Package", deb.name)] = {"version": info.get("Version"), "arch": info.get("Architecture"),
                                                   "sha256": _sha256(deb)}
    missing = sorted(set(DEBIAN_PACKAGES) - set(recorded))
    if missing:
        raise StageError(f"arm64 sysroot: apt-get download did not fetch {', '.join(missing)}")
    return recorded


def _wheels(work: Path, site: Path, say: Callable[[str], None]) -> dict:
    wheels = work / "wheels"
    wheels.mkdir()
    site.mkdir(parents=True)
    requirements = work / "requirements.txt"
    requirements.write_text("".join(f"{name}=={v} --hash=sha256:{h}\n" for name, (v, h) in sorted(WHEELS.items())))
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    say("pip download: " + ", ".join(f"{n}=={v}" for n, (v, _) in sorted(WHEELS.items())) + " (aarch64 wheels)")
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--only-binary=:all:", *platforms, "--python-version", PYTHON_VERSION, "--implementation", "cp",
          "--abi", abi, "--require-hashes", "-r", str(requirements), "-d", str(wheels)],
         "pip download of the aarch64 wheels")
    recorded: dict = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name = wheel.name.split("-", 1)[0].lower()
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        recorded[name] = {"version": wheel.name.split("-")[1], "file": wheel.name, "sha256": _sha256(wheel)}
    missing = sorted(set(WHEELS) - set(recorded))
    if missing:
        raise StageError(f"arm64 sysroot: pip download did not fetch {', '.join(missing)}")
    return recorded


def _smoke(sysroot: Sysroot) -> dict:
    """Import numpy and onnxruntime with the emulated Python (which also leaves their bytecode
    compiled in the sysroot for later runs) and return what they report."""
    proc = _run(sysroot.command(["-c", _SMOKE], _SMOKE_CPU), "the emulated import of numpy and onnxruntime",
                env=sysroot.environment(), timeout=600)
    try:
        verified = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise StageError(f"arm64 sysroot: the emulated Python printed no versions ({proc.stdout[:200]!r})") from None
    if verified.get("machine") != "aarch64":
        raise StageError(f"arm64 sysroot: the emulated Python reports machine {verified.get('machine')!r}, "
                         "not aarch64")
    return verified


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `edgekd arm-sysroot` on the main command's subparsers."""
    p = subparsers.add_parser("arm-sysroot", help="build the aarch64 sysroot that ARM checks run in",
                              description=__doc__.splitlines()[0])
    _arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even when a sysroot for these pins exists")
    p.add_argument("--quiet", action="store_true", help="print only the sysroot's folder")


def run(args: argparse.Namespace) -> int:
    """Build (or find) the sysroot and print what it holds; returns the exit code."""
    quiet = getattr(args, "quiet", False)
    built = build_sysroot(force=args.force, log=None if quiet else lambda m: print(m, file=sys.stderr))
    if quiet:
        print(built.path)
        return 0
    m = built.manifest
    verified = m.get("verified", {})
    print(f"aarch64 sysroot {built.path}")
    print(f"  built {m.get('built_at')} · {m.get('qemu')}")
    print(f"  python {verified.get('python')} · numpy {verified.get('numpy')} · onnxruntime "
          f"{verified.get('onnxruntime')} · providers {', '.join(verified.get('providers', []))}")
    print(f"  {len(m.get('debian_packages', {}))} Debian {DEBIAN_SUITE} arm64 packages (versions in manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edgekd.bench.sysroot [--force] [--quiet]`."""
    p = argparse.ArgumentParser(prog="python -m edgekd.bench.sysroot", description=__doc__.splitlines()[0])
    _arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except EdgeKDError as e:
        print(f"edgekd: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
