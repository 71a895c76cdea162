#!/usr/bin/env python3
"""Known-answer packets of wire version 3 for crypto.rs's `known_answer_packets`
test, from an implementation independent of ours. Needs pyca/cryptography
(48 tested). Run: python3 wire_v3_kat.py"""
# Independent reference for ela-fast wire v3 (pyca/cryptography: HKDF,
# Blowfish-ECB from the decrepit module, Poly1305, ChaCha20Poly1305).
import struct
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20 as ChaCha20Alg
from cryptography.hazmat.decrepit.ciphers.algorithms import Blowfish
from cryptography.hazmat.primitives.poly1305 import Poly1305
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

def hkdf(ikm, info, n=32):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=b"ela-fast v1", info=info).derive(ikm)

def bf_blocks(key, inputs):
    enc = Cipher(Blowfish(key), modes.ECB()).encryptor()
    return enc.update(b"".join(struct.pack(">Q", x) for x in inputs)) + enc.finalize()

def pad16(b):
    return b + b"\0" * (-len(b) % 16)

def seal_blowfish(key, header, payload):
    header = header[:3] + b"\x00" + header[4:]   # suite 0
    counter = struct.unpack(">Q", header[16:24])[0]
    base = (counter << 11) & (2**64 - 1)
    nblocks = 4 + (len(payload) + 7) // 8
    ks = bf_blocks(key, [base | j for j in range(nblocks)])
    otk, stream = ks[:32], ks[32:]
    ct = bytes(p ^ k for p, k in zip(payload, stream))
    aad = header[:2] + b"\0" + header[3:]
    mac = Poly1305(otk)
    mac.update(pad16(aad) + pad16(ct) + struct.pack("<QQ", len(aad), len(ct)))
    return header + ct + mac.finalize()

def auth_blowfish(key, header, payload):
    """A relay wrapping: tag over header and clear payload."""
    header = header[:3] + b"\x00" + header[4:]
    counter = struct.unpack(">Q", header[16:24])[0]
    base = (counter << 11) & (2**64 - 1)
    otk = bf_blocks(key, [base | j for j in range(4)])
    aad = header[:2] + b"\0" + header[3:]
    mac = Poly1305(otk)
    mac.update(pad16(aad) + pad16(payload) + struct.pack("<QQ", len(aad), len(payload)))
    return header + payload + mac.finalize()

def auth_chacha(key, header, payload):
    header = header[:3] + b"\x01" + header[4:]
    nonce = b"\0\0\0\0" + header[16:24]
    otk = Cipher(ChaCha20Alg(key, struct.pack("<I", 0) + nonce), None).encryptor().update(b"\0" * 32)
    aad = header[:2] + b"\0" + header[3:]
    mac = Poly1305(otk)
    mac.update(pad16(aad) + pad16(payload) + struct.pack("<QQ", len(aad), len(payload)))
    return header + payload + mac.finalize()

def seal_chacha(key, header, payload):
    header = header[:3] + b"\x01" + header[4:]   # suite 1
    nonce = b"\0\0\0\0" + header[16:24]
    aad = header[:2] + b"\0" + header[3:]
    out = ChaCha20Poly1305(key).encrypt(nonce, payload, aad)
    return header + out

secret = bytes(range(32))
root = bytes(range(100, 132))   # one direction's key from a handshake
epoch = 5
counter = (5 << 14) + 9
header = bytes([3, 0, 3, 0]) + struct.pack(">I", 5) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">Q", counter)
payload = bytes(range(45))
for suite, name, seal, auth in [(0, b"blowfish", seal_blowfish, auth_blowfish), (1, b"chacha20-poly1305", seal_chacha, auth_chacha)]:
    ks = hkdf(root, b"ela-fast v2 " + name + b" session" + struct.pack(">Q", epoch))
    kc = hkdf(secret, b"ela-fast v2 " + name + b" control")
    kce = hkdf(secret, b"ela-fast v2 " + name + b" control" + struct.pack(">I", 7))
    for label, k, f in [("session", ks, seal), ("control", kc, seal), ("control epoch 7", kce, seal), ("relay wrapping (session key)", ks, auth)]:
        pkt = f(k, header, payload)
        print(name.decode(), label)
        print("  header", pkt[:24].hex())
        print("  ct    ", pkt[24:-16].hex())
        print("  tag   ", pkt[-16:].hex())
