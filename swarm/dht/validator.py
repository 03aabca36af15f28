"""Server records in the DHT that only their server can write.

A server's record lives under subkey = its peer id. The record's value carries the server's libp2p public
key, and the value is signed with the matching private key (the one behind the peer id) over the DHT key,
the subkey, the value and the expiration time. Every DHT peer of the swarm (servers, clients, `cocoon dht`)
runs this validator, so a record under a peer id is stored and read only if that peer signed it, and a
signed record expires within MAX_RECORD_TTL. A client then dials the peer id of the record, and libp2p's
handshake proves it talks to the key that signed it. Subkeys that are not peer ids (evidence) pass here;
their readers check them on their own.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from multihash import coerce_code, encode as multihash_encode

MAX_RECORD_TTL = 600.0  # seconds a signed server record may live (servers re-announce every few seconds)
CLOCK_SKEW = 60.0
SIGNATURE_MARKER = b"[cocoon-signature]"


def load_identity(path: str) -> rsa.RSAPrivateKey:
    """The private key of an identity file (hivemind's: a libp2p PrivateKey protobuf, RSA)."""
    with open(path, "rb") as f:
        proto = crypto_pb2.PrivateKey.FromString(f.read())
    if proto.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{path}: only RSA identities (hivemind's) can sign records")
    return serialization.load_der_private_key(proto.data, password=None)


def public_key_bytes(private_key: rsa.RSAPrivateKey) -> bytes:
    """The libp2p PublicKey protobuf of a key: what its peer id is the hash of."""
    der = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def peer_id_of(public_key: bytes) -> str:
    return PeerID(multihash_encode(hashlib.sha256(public_key).digest(), coerce_code("sha2-256"))).to_base58()


class ServerRecordValidator(RecordValidatorBase):
    """Signs this server's records (with ``private_key``) and checks everyone's."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None):
        self._key_der = None if private_key is None else private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self._own_subkey = None
        if private_key is not None:
            self._own_subkey = MSGPackSerializer.dumps(peer_id_of(public_key_bytes(private_key)))
        self._private_key = private_key

    def __getstate__(self):  # the DHT runs in a process of its own: the key crosses as bytes
        return {"_key_der": self._key_der}

    def __setstate__(self, state):
        key = state["_key_der"]
        self.__init__(None if key is None else serialization.load_der_private_key(key, password=None))

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._private_key is None or record.subkey != self._own_subkey:
            return record.value
        signature = self._private_key.sign(_signed_bytes(record), padding.PKCS1v15(), hashes.SHA256())
        return record.value + SIGNATURE_MARKER + signature

    def validate(self, record: DHTRecord) -> bool:
        peer_id = peer_id_of_subkey(record.subkey)
        if peer_id is None:
            return True  # not a server's record
        if record.expiration_time > get_dht_time() + MAX_RECORD_TTL + CLOCK_SKEW:
            return False
        payload, marker, signature = record.value.rpartition(SIGNATURE_MARKER)
        if not marker:
            return False
        try:
            value = MSGPackSerializer.loads(payload)
            public_key = value["public_key"]
            if not isinstance(public_key, bytes) or peer_id_of(public_key) != peer_id:
                return False
            key = serialization.load_der_public_key(crypto_pb2.PublicKey.FromString(public_key).data)
            key.verify(signature, _signed_bytes(dataclasses.replace(record, value=payload)), padding.PKCS1v15(),
                       hashes.SHA256())
        except Exception:  # malformed in any way, or InvalidSignature
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        payload, marker, _ = record.value.rpartition(SIGNATURE_MARKER)
        return payload if marker else record.value

    @property
    def priority(self) -> int:
        return 10  # like hivemind's RSASignatureValidator: before anything that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, ServerRecordValidator) and other._private_key is None


def _signed_bytes(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps((b"cocoon-server-record", record.key, record.subkey, record.value,
                                    record.expiration_time))


def peer_id_of_subkey(subkey: bytes) -> str | None:
    """The peer id a (serialized) subkey names, or None when it names none."""
    try:
        return parse_peer_id(MSGPackSerializer.loads(subkey))
    except Exception:
        return None


def parse_peer_id(value: Any) -> str | None:
    """``value`` when it is a peer id in its canonical base58 form, else None."""
    if not isinstance(value, str) or not 40 <= len(value) <= 60:
        return None
    try:
        return value if PeerID.from_base58(value).to_base58() == value else None
    except Exception:
        return None
