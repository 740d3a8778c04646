"""Firebase ID tokens for local runs and tests: unsigned Auth-emulator tokens (alg: none).

Only accepted where FIREBASE_AUTH_EMULATOR_HOST is set.  python -m local.idtoken alice
"""

from __future__ import annotations

import base64
import json
import time


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def emulator_id_token(uid: str, project: str, *, lifetime: int = 3600, **claims: object) -> str:
    now = int(time.time())
    payload = {
        "iss": f"https://securetoken.google.com/{project}",
        "aud": project,
        "auth_time": now,
        "user_id": uid,
        "sub": uid,
        "iat": now,
        "exp": now + lifetime,
        "firebase": {"identities": {}, "sign_in_provider": "custom"},
        **claims,
    }
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description="Print an Auth-emulator ID token (local runs only).")
    parser.add_argument("uid")
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT", "demo-pushline"))
    args = parser.parse_args()
    print(emulator_id_token(args.uid, args.project))


if __name__ == "__main__":
    main()
