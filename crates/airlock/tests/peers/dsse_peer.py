#!/usr/bin/env python3
"""A DSSE peer nobody on this project wrote: securesystemslib's reference implementation.

  dsse_peer.py verify ENVELOPE.json PUBKEY.pem KEYID   exit 0 and print the payload if valid
  dsse_peer.py verify-cert ENVELOPE.json CERT.pem KEYID  the same, with the key of an X.509 certificate
  dsse_peer.py sign PAYLOAD_TYPE PAYLOAD PRIVKEY.pem  print a signed envelope as JSON
"""
import json
import sys

from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey


def main() -> int:
    cmd = sys.argv[1]
    if cmd in ("verify", "verify-cert"):
        envelope_path, key_path, keyid = sys.argv[2:5]
        with open(envelope_path, "rb") as f:
            envelope = Envelope.from_dict(json.load(f))
        with open(key_path, "rb") as f:
            pem = f.read()
        public = load_pem_x509_certificate(pem).public_key() if cmd == "verify-cert" else load_pem_public_key(pem)
        key = SSlibKey.from_crypto(public, keyid=keyid)
        try:
            envelope.verify([key], 1)
        except Exception as e:  # securesystemslib raises VerificationError
            print(f"refused: {e}", file=sys.stderr)
            return 1
        sys.stdout.write(envelope.payload.decode())
        return 0
    if cmd == "sign":
        payload_type, payload, key_path = sys.argv[2:5]
        with open(key_path, "rb") as f:
            signer = CryptoSigner(load_pem_private_key(f.read(), password=None))
        envelope = Envelope(payload.encode(), payload_type, {})
        envelope.sign(signer)
        print(json.dumps(envelope.to_dict()))
        return 0
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
