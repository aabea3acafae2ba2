#!/usr/bin/env python3
"""NTLM over SMTP with pyspnego's NTLM (the Windows-like client: NTLMv2 with key exchange and a
MIC whenever the server's CHALLENGE carries a timestamp), for relay/tests/ntlm.rs.

    ntlm_client.py SERVER_NAME ADDRESS PORT CA_FILE USER PASSWORD [--alter-challenge]

SERVER_NAME is the name on the relay's certificate, ADDRESS where it listens.

STARTTLS, then AUTH NTLM with the NEGOTIATE as initial response. --alter-challenge changes one
byte of the CHALLENGE's version field before the client sees it (what a man in the middle
would do): the response still matches, the MIC must not. Prints the final AUTH reply
line ("235 2.7.0 ...") and exits 0 on 235, 1 otherwise.
"""
import base64
import smtplib
import ssl
import sys

import spnego


def main() -> int:
    host, address, port, ca, user, password = sys.argv[1:7]
    ctx = ssl.create_default_context(cafile=ca)
    with smtplib.SMTP(timeout=30) as s:
        s.connect(address, int(port))
        # STARTTLS checks the certificate against this name (smtplib takes it from here).
        s._host = host
        s.ehlo("ntlm-client.example")
        s.starttls(context=ctx)
        s.ehlo("ntlm-client.example")
        client = spnego.client(user, password, hostname=host, service="smtp", protocol="ntlm")
        negotiate = client.step()
        code, challenge = s.docmd("AUTH", "NTLM " + base64.b64encode(negotiate).decode())
        if code != 334:
            print(f"{code} {challenge.decode(errors='replace')}")
            return 1
        challenge = bytearray(base64.b64decode(challenge))
        if "--alter-challenge" in sys.argv[7:]:
            challenge[48] ^= 0x01
        authenticate = client.step(bytes(challenge))
        code, text = s.docmd(base64.b64encode(authenticate).decode())
        print(f"{code} {text.decode(errors='replace')}")
        return 0 if code == 235 else 1


if __name__ == "__main__":
    sys.exit(main())
