"""The vocabularies and defaults of the options both sides share. Holds no secrets and imports
nothing of either side, so the server, the trusted engine and the CLI all take them from here."""
from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")  # where the server computes
PRIVACY_MODES = ("plain", "otp")  # what the server sees: activations, or one-time-padded integers
DATA_PLANES = ("socket", "shm")  # where tensors travel: in the messages, or through /dev/shm
CONTROL_PLANES = ("doorbell", "socket")  # with shm, how requests are announced: polled words, or messages
DTYPES = ("float32", "bfloat16", "float16")  # of the weights, the wire and the trusted activations

DEFAULT_TIMEOUT_MS = 60_000  # deadline of one request to the server
ATTESTATION_KINDS = ("auto", "gramine", "tdx", "none")
DEFAULT_MASK_POOL_ROWS = 32  # otp: pads kept ready per weight
DEFAULT_SPIN_MAX_US = 2_000  # longest a side polls the doorbell before it sleeps on its socket


def rpcs_per_forward(num_layers: int) -> int:
    """Round trips of one forward pass: q|k|v, o, gate|up and down per layer, plus the LM head."""
    return 4 * num_layers + 1
