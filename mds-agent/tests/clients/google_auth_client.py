"""Google's own Python client (google-auth, from PyPI), used exactly as an application would on a
GCE VM: no GCE_METADATA_* overrides, the default metadata address and name. Run as a test user
inside the sandbox by the contract tests; prints one JSON object with what the library got.

Every step is reported on its own, so one failing step does not hide what the others saw.
"""
import json
import traceback

import google.auth
import google.auth.jwt
import google.auth.transport.requests
from google.auth import compute_engine
from google.auth.compute_engine import _metadata

AUDIENCE = "https://example.test"


def step(out, name, fn):
    try:
        out[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported to the test, which asserts on it
        out[name + "_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()


def main():
    out = {"google_auth_version": google.auth.__version__}
    request = google.auth.transport.requests.Request()

    # What the library's own environment detection makes of the agent.
    step(out, "ping", lambda: _metadata.ping(request))

    def access_token():
        credentials = compute_engine.Credentials()
        credentials.refresh(request)
        return {
            "token": credentials.token,
            "service_account_email": credentials.service_account_email,
            "expiry": credentials.expiry.isoformat() if credentials.expiry else None,
            "valid": credentials.valid,
        }

    step(out, "access", access_token)

    def id_token():
        credentials = compute_engine.IDTokenCredentials(
            request, target_audience=AUDIENCE, use_metadata_identity_endpoint=True
        )
        credentials.refresh(request)
        claims = google.auth.jwt.decode(credentials.token, verify=False)
        return {
            "token": credentials.token,
            "claims": claims,
            "service_account_email": credentials.service_account_email,
        }

    step(out, "id", id_token)

    def default():
        credentials, project = google.auth.default()
        return {"type": type(credentials).__module__ + "." + type(credentials).__name__, "project": project}

    step(out, "default", default)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
