"""Reading the browser identity that older vlchat pages kept in localStorage (Gradio BrowserState).

Gradio 6's BrowserState stores a value as `base64(iv) + ":" + openssl_string`, where the second
part is CryptoJS's `AES.encrypt(json, passphrase)` with passphrase = the hex SHA-256 of the
server's `browser.key`: OpenSSL's format (`Salted__`, an 8-byte salt, AES-256-CBC with key and IV
from EVP_BytesToKey over MD5, PKCS#7 padding). The IV before the colon is ignored by CryptoJS
(the derived one is used), and so here. Decryption runs once per browser, on its first visit after
the upgrade, so a small pure-Python AES (no new dependency) is plenty.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

# -- AES-256 decryption (FIPS-197), tables computed once at import ----------------------------


def _xtime(a: int) -> int:
    return ((a << 1) ^ 0x1B) & 0xFF if a & 0x80 else a << 1


def _mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a, b = _xtime(a), b >> 1
    return out


def _sbox() -> list[int]:
    inv = [0] * 256  # multiplicative inverses in GF(2^8)
    for a in range(1, 256):
        for b in range(1, 256):
            if _mul(a, b) == 1:
                inv[a] = b
                break
    box = []
    for a in range(256):
        x = inv[a]
        s = x
        for shift in range(1, 5):
            s ^= ((x << shift) | (x >> (8 - shift))) & 0xFF
        box.append(s ^ 0x63)
    return box


_SBOX = _sbox()
_INV_SBOX = [0] * 256
for _i, _v in enumerate(_SBOX):
    _INV_SBOX[_v] = _i
_MUL = {c: [_mul(a, c) for a in range(256)] for c in (9, 11, 13, 14)}


def _expand_key(key: bytes) -> list[list[int]]:
    """Round keys (15 of 16 bytes) for a 32-byte key."""
    words = [list(key[i:i + 4]) for i in range(0, 32, 4)]
    rcon = 1
    for i in range(8, 60):
        w = list(words[i - 1])
        if i % 8 == 0:
            w = [_SBOX[b] for b in w[1:] + w[:1]]
            w[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            w = [_SBOX[b] for b in w]
        words.append([a ^ b for a, b in zip(words[i - 8], w, strict=True)])
    return [sum(words[r * 4:r * 4 + 4], []) for r in range(15)]


def _decrypt_block(block: bytes, rounds: list[list[int]]) -> bytes:
    s = [b ^ k for b, k in zip(block, rounds[14], strict=True)]
    for r in range(13, -1, -1):
        # InvShiftRows (state is column-major: byte row i of column c sits at 4c + i), InvSubBytes
        s = [_INV_SBOX[s[(4 * ((c - i) % 4)) + i]] for c in range(4) for i in range(4)]
        s = [b ^ k for b, k in zip(s, rounds[r], strict=True)]
        if r:
            m9, m11, m13, m14 = _MUL[9], _MUL[11], _MUL[13], _MUL[14]
            out = []
            for c in range(4):
                a0, a1, a2, a3 = s[4 * c:4 * c + 4]
                out += [m14[a0] ^ m11[a1] ^ m13[a2] ^ m9[a3], m9[a0] ^ m14[a1] ^ m11[a2] ^ m13[a3],
                        m13[a0] ^ m9[a1] ^ m14[a2] ^ m11[a3], m11[a0] ^ m13[a1] ^ m9[a2] ^ m14[a3]]
            s = out
    return bytes(s)


def aes256_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-256-CBC decryption with PKCS#7 padding removed; ValueError when the padding is wrong."""
    if len(key) != 32 or len(iv) != 16 or not data or len(data) % 16:
        raise ValueError("bad AES input sizes")
    rounds = _expand_key(key)
    out, prev = bytearray(), iv
    for i in range(0, len(data), 16):
        block = data[i:i + 16]
        out += bytes(a ^ b for a, b in zip(_decrypt_block(block, rounds), prev, strict=True))
        prev = block
    pad = out[-1]
    if not 1 <= pad <= 16 or out[-pad:] != bytes([pad]) * pad:
        raise ValueError("bad padding")
    return bytes(out[:-pad])


def evp_bytes_to_key(passphrase: bytes, salt: bytes, size: int = 48) -> bytes:
    """OpenSSL's EVP_BytesToKey with MD5 and one iteration (CryptoJS's default KDF)."""
    out, prev = b"", b""
    while len(out) < size:
        prev = hashlib.md5(prev + passphrase + salt).digest()
        out += prev
    return out[:size]


def decrypt_browser_state(stored: str, browser_key: str) -> object | None:
    """The value a Gradio BrowserState stored (JSON-decoded), or None if it is not one of ours."""
    _, sep, openssl = stored.partition(":")
    if not sep or len(openssl) > 4096:
        return None
    try:
        raw = base64.b64decode(openssl, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) < 32 or raw[:8] != b"Salted__":
        return None
    passphrase = hashlib.sha256(browser_key.encode()).hexdigest().encode()
    derived = evp_bytes_to_key(passphrase, raw[8:16])
    try:
        plain = aes256_cbc_decrypt(derived[:32], derived[32:], raw[16:])
        return json.loads(plain.decode())
    except (ValueError, UnicodeDecodeError):
        return None
