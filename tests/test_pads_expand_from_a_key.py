"""Pads expanded from a shared key: AES-128-CTR exactly (NIST's vectors), laid out as documented,
never the same pad for two requests."""
import struct

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from teegpu.pads import PAD_DOMAIN, counter_block, expand_pads, write_keystream
from teegpu.protocol import LINEAR_OPS, MAX_ROWS, Op
from teegpu.ring import MAX_INNER

# NIST SP 800-38A, F.5.1 CTR-AES128.Encrypt: key, initial counter block, plaintext, ciphertext
NIST_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
NIST_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
                           "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
NIST_CIPHER = bytes.fromhex("874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"
                            "5ae4df3edbd5d35e5b4f09020db03eab" "1e031dda2fbe03d1792170a0f3009cee")


def test_the_keystream_is_aes_128_ctr_by_nists_vectors():
    room = torch.zeros(64 + 15, dtype=torch.uint8)
    write_keystream(NIST_KEY, NIST_COUNTER, room, 64)
    expected = bytes(p ^ c for p, c in zip(NIST_PLAIN, NIST_CIPHER))
    assert bytes(room[:64].numpy()) == expected
    with pytest.raises(ValueError, match="room"):
        write_keystream(NIST_KEY, NIST_COUNTER, torch.zeros(64, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="16 bytes"):
        write_keystream(NIST_KEY[:8], NIST_COUNTER, room, 64)


def test_the_counter_block_separates_nonce_op_and_layer():
    assert counter_block(5, Op.QKV, 0) == bytes.fromhex("0000000000000005" "01" "0001" "50" "00000000")
    assert counter_block(2 ** 64 - 1, Op.LM_HEAD, -1) == bytes.fromhex("ffffffffffffffff" "05" "0000" "50" "00000000")
    assert counter_block(1, Op.DOWN, 29)[11] == PAD_DOMAIN
    # the largest request's keystream stays within the block counter's 32 bits
    assert MAX_ROWS * MAX_INNER * 8 // 16 <= 1 << 32
    with pytest.raises(ValueError, match="64-bit"):
        counter_block(-1, Op.QKV, 0)


def test_pads_are_the_keystream_as_little_endian_int64():
    key = bytes(range(16))
    pads = expand_pads(key, 7, Op.GATE_UP, 3, rows=3, d_in=40)
    stream = Cipher(algorithms.AES(key), modes.CTR(counter_block(7, Op.GATE_UP, 3))).encryptor().update(bytes(3 * 40 * 8))
    assert pads.shape == (3, 40) and pads.dtype == torch.int64 and pads.is_contiguous()
    assert pads.view(-1).tolist() == list(struct.unpack("<120q", stream))
    # more than one chunk of keystream: the same bytes as in one go
    big = expand_pads(key, 8, Op.QKV, 0, rows=300, d_in=576)
    stream = Cipher(algorithms.AES(key), modes.CTR(counter_block(8, Op.QKV, 0))).encryptor().update(bytes(300 * 576 * 8))
    assert bytes(big.view(torch.uint8).view(-1).numpy()) == stream


def test_two_requests_never_share_a_pad():
    key = bytes(16)
    firsts = set()
    requests = [(nonce, op, layer) for nonce in range(1, 9) for op in (*LINEAR_OPS, Op.LM_HEAD) for layer in (-1, 0, 1)]
    for nonce, op, layer in requests:
        pads = expand_pads(key, nonce, op, layer, rows=4, d_in=8)
        firsts.update(pads[:, 0].tolist())
    assert len(firsts) == 4 * len(requests)  # every row of every request differs
    other = expand_pads(bytes([1] * 16), 1, Op.QKV, 0, rows=4, d_in=8)  # another session's key
    assert not set(other[:, 0].tolist()) & firsts
