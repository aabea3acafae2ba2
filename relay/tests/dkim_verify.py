#!/usr/bin/env python3
"""Independent DKIM verifier for relay/tests/dkim.rs: dkimpy (Debian python3-dkim) checks every
DKIM-Signature of a message, fetching the selector keys over DNS with dnspython from the given
server, so the test's public keys really come from the DNS answers.

    dkim_verify.py MESSAGE_FILE DNS_IP DNS_PORT

Prints one JSON object per signature: {"d", "s", "a", "h", "ok", "error"}.
"""
import json
import sys

import dkim
import dns.message
import dns.query
import dns.rdatatype


def main():
    path, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(path, "rb") as f:
        message = f.read()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        response = dns.query.udp(query, ip, port=port, timeout=timeout)
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(list(rrset.items)[0].strings)
        return None

    verifier = dkim.DKIM(message)
    count = sum(
        1
        for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        if line.lower().startswith(b"dkim-signature:")
    )
    for idx in range(count):
        error = None
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            ok, error = False, str(e)
        sig = verifier.signature_fields or {}
        print(
            json.dumps(
                {
                    "d": sig.get(b"d", b"").decode(),
                    "s": sig.get(b"s", b"").decode(),
                    "a": sig.get(b"a", b"").decode(),
                    "h": sig.get(b"h", b"").decode(),
                    "ok": bool(ok),
                    "error": error,
                }
            )
        )


if __name__ == "__main__":
    main()
