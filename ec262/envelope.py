"""The encryption envelope (docs/protocol.md section 4): AES-128-CBC with a
synthetic IV and an HMAC-SHA256 tag, built only from `cryptography`.

Deterministic on purpose: the foreman compares replicas' results while
they are still encrypted, so the same key and plaintext must give the same
ciphertext. The IV is therefore derived from the plaintext (an SIV-style
construction), and the tag authenticates everything, so a wrong key or a
flipped byte raises DecryptionError instead of returning garbage.

    K (16 bytes from discovery)
    enc_key = HKDF-SHA256(K, 16, info="ec262/v1 enc")
    mac_key = HKDF-SHA256(K, 32, info="ec262/v1 mac")
    iv      = HMAC-SHA256(mac_key, "iv" || plaintext)[:16]
    ct      = AES-128-CBC(enc_key, iv, PKCS7(plaintext))
    tag     = HMAC-SHA256(mac_key, version || iv || ct)
    text    = Base64(version || iv || ct || tag)
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ec262.encoding import decode_result, encode_result
from ec262.errors import DecryptionError

VERSION = b"\x01"
KEY_BYTES = 16
_IV_BYTES = 16
_TAG_BYTES = 32
_BLOCK = 16
_MIN_LENGTH = 1 + _IV_BYTES + _BLOCK + _TAG_BYTES


@functools.lru_cache(maxsize=256)
def _derive(key: bytes) -> tuple[bytes, bytes]:
    """(enc_key, mac_key) for a task key; cached because a worker seals and
    a foreman opens several results under one key."""
    enc_key = HKDF(hashes.SHA256(), 16, salt=None, info=b"ec262/v1 enc").derive(key)
    mac_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"ec262/v1 mac").derive(key)
    return enc_key, mac_key


def _check_key(key: bytes, error: type[Exception]) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise error(f"a task key is {KEY_BYTES} bytes, not {len(key) if key else 0}")
    return bytes(key)


def _hmac(mac_key: bytes, *parts: bytes) -> bytes:
    mac = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    for part in parts:
        mac.update(part)
    return mac.finalize()


def seal(plaintext: bytes, key: bytes) -> str:
    """Encrypt and authenticate `plaintext` under the task key; Base64 text."""
    enc_key, mac_key = _derive(_check_key(key, ValueError))
    iv = _hmac(mac_key, b"iv", plaintext)[:_IV_BYTES]
    pad = _BLOCK - len(plaintext) % _BLOCK
    encryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
    ct = encryptor.update(plaintext) + encryptor.update(bytes((pad,)) * pad) + encryptor.finalize()
    tag = _hmac(mac_key, VERSION, iv, ct)
    return binascii.b2a_base64(b"".join((VERSION, iv, ct, tag)), newline=False).decode("ascii")


def open_sealed(text: str | bytes, key: bytes) -> bytes:
    """The plaintext of an envelope; DecryptionError for anything that does
    not authenticate under this key."""
    enc_key, mac_key = _derive(_check_key(key, DecryptionError))
    try:
        raw = memoryview(binascii.a2b_base64(text, strict_mode=True))
    except (binascii.Error, ValueError, TypeError):
        raise DecryptionError("ciphertext is not valid Base64") from None
    if len(raw) < _MIN_LENGTH or (len(raw) - 1 - _IV_BYTES - _TAG_BYTES) % _BLOCK:
        raise DecryptionError(f"ciphertext has an impossible length ({len(raw)} bytes)")
    if raw[:1] != VERSION:
        raise DecryptionError(f"unknown envelope version {raw[0]}")
    iv, ct, tag = raw[1 : 1 + _IV_BYTES], raw[1 + _IV_BYTES : -_TAG_BYTES], raw[-_TAG_BYTES:]
    if not hmac.compare_digest(_hmac(mac_key, VERSION, iv, ct), tag):
        raise DecryptionError("ciphertext does not authenticate: wrong key or tampered data")
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(iv))).decryptor()
    padded = decryptor.update(ct) + decryptor.finalize()
    pad = padded[-1]
    if not 1 <= pad <= _BLOCK or padded[-pad:] != bytes((pad,)) * pad:
        # Unreachable without forging the tag; checked all the same.
        raise DecryptionError("ciphertext padding is invalid")
    return padded[:-pad]


def encrypt_data(data: Mapping, key: bytes) -> str:
    """`ec262.encrypt_data`: the envelope of a result dictionary."""
    return seal(encode_result(data), key)


def decrypt_data(text: str | bytes, key: bytes) -> dict:
    """`ec262.decrypt_data`: the result dictionary inside an envelope."""
    return decode_result(open_sealed(text, key))


def ciphertext_sha256(ciphertext: str) -> str:
    """What a result's commitment names (docs/protocol.md section 10): the
    SHA-256, lowercase hex, of the UTF-8 bytes of the exact Base64 text
    sent as SubmitResult.ciphertext."""
    return hashlib.sha256(ciphertext.encode()).hexdigest()
