"""CurveZMQ (libzmq's CURVE): an authenticated, encrypted channel between client and server.

Keys are ZeroMQ certificate files as pyzmq's zmq.auth writes them: NAME.key (public) and
NAME.key_secret (public + secret). The server accepts only clients whose public
certificate lies in its allow-list directory (a ZAP handler in a thread); the client pins
the server's public key, so it cannot talk to anyone else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from teegpu.errors import ConfigError


def generate_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 0600) into directory; return (public, secret)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_key(path: str | os.PathLike, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) of a certificate file; ConfigError naming what is wrong."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read key file {path}: {e}") from e
    if need_secret and not secret:
        raise ConfigError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


@dataclass(frozen=True, slots=True)
class ClientCurve:
    secret_file: str  # this client's NAME.key_secret
    server_public_file: str  # the pinned server's NAME.key

    def apply(self, sock: zmq.Socket) -> None:
        public, secret = load_key(self.secret_file, need_secret=True)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = load_key(self.server_public_file, need_secret=False)[0]


@dataclass(frozen=True, slots=True)
class ServerCurve:
    secret_file: str  # the server's NAME.key_secret
    allow_dir: str  # directory of the client public keys (NAME.key) it accepts

    def apply(self, sock: zmq.Socket, context: zmq.Context) -> ThreadAuthenticator:
        if not Path(self.allow_dir).is_dir():
            raise ConfigError(f"client allow list {self.allow_dir} is not a directory")
        public, secret = load_key(self.secret_file, need_secret=True)
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow_dir))
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_server = True
        return auth
