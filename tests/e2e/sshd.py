"""A real OpenSSH server on 127.0.0.1 for the remote-benchmark tests: generated host and client keys,
key authentication only, and an ssh config that names it `board`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    """A running sshd and the files a client needs to reach it."""

    process: subprocess.Popen
    port: int
    directory: Path
    host_public_key: str
    client_key: Path

    def ssh_config(self, name: str = "board", known_hosts: Path | None = None, identity: Path | None = None) -> Path:
        """An ssh config naming this server `name`; known_hosts defaults to one holding its key."""
        if known_hosts is None:
            known_hosts = self.directory / "known_hosts"
            known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public_key}\n")
        config = self.directory / f"ssh_config.{name}.{known_hosts.name}"
        config.write_text("\n".join([
            f"Host {name}",
            "  HostName 127.0.0.1",
            f"  Port {self.port}",
            "  User root",
            f"  IdentityFile {identity or self.client_key}",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            f"  UserKnownHostsFile {known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "",
        ]))
        return config

    def stop(self) -> None:
        """Stop this sshd (only the process this module started)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sshd(directory: Path, timeout_s: float = 15.0) -> Sshd:
    """Start sshd in the foreground on a free loopback port; wait until it accepts connections."""
    if shutil.which("ssh-keygen") is None:
        raise RuntimeError("ssh-keygen is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    host_key = directory / "host_ed25519"
    client_key = directory / "client_ed25519"
    host_public = _keygen(host_key)
    (directory / "authorized_keys").write_text(_keygen(client_key) + "\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "PermitRootLogin yes", "LogLevel ERROR", "",
    ]))
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(directory / "sshd.log", "wb"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(directory / 'sshd.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Sshd(proc, port, directory, host_public, client_key)
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout_s} s")
