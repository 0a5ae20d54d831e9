"""Reading the browser identity that older vlchat pages kept in localStorage (Gradio BrowserState).

Gradio 6's BrowserState stores a value as `base64(iv) + ":" + openssl_string`, where the second
part is CryptoJS's `AES.encrypt(json, passphrase)` with passphrase = the hex SHA-256 of the
server's `browser.key`: OpenSSL's format (`Salted__`, an 8-byte salt, AES-256-CBC with key and IV
from EVP_BytesToKey over MD5, PKCS#7 padding). The IV before the colon is ignored by CryptoJS
(the derived one is used), and so here. Decryption runs once per browser, on its first visit after
the upgrade; AES itself is the `cryptography` package's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json


def aes256_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-256-CBC decryption with PKCS#7 padding removed; ValueError when the input or padding is wrong."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(key) != 32 or len(iv) != 16 or not data or len(data) % 16:
        raise ValueError("bad AES input sizes")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = decryptor.update(data) + decryptor.finalize()
    return unpadder.update(plain) + unpadder.finalize()  # ValueError on bad padding


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
