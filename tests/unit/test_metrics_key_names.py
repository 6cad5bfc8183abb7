"""What ``/metrics`` says about API keys (issue 20 item 9, docs/security.md "What /metrics
shows"): per-key series carry the key's name from the keys file, never the key, its digest, nor a
key a client presented that is not known."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from models.config import Settings
from services.gateway.auth import keyring
from services.runtime.errors import Forbidden, Unauthenticated

KEY = "team-a-key-0123456789abcdef"
GUESS = "a-guessed-key-9876543210fedcba"


def test_metrics_name_keys_and_never_show_them(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys_file.write_text(f"keys:\n  - name: team-a\n    key: sha256:{digest}\n    models: [iris]\n")
    ring = keyring(Settings(_env_file=None, api_keys_file=keys_file))
    assert ring is not None
    key = ring.authenticate(f"Bearer {KEY}")
    with pytest.raises(Forbidden):
        key.check_model("digits")
    with pytest.raises(Unauthenticated):
        ring.authenticate(f"Bearer {GUESS}")

    exposed = generate_latest(REGISTRY).decode()
    assert 'servery_auth_rejected_total{key="team-a",reason="forbidden"}' in exposed
    assert 'servery_auth_rejected_total{key="-",reason="unauthenticated"}' in exposed
    guess_digest = hashlib.sha256(GUESS.encode()).hexdigest()
    for secret in (KEY, digest, GUESS, guess_digest):
        assert secret not in exposed
        assert secret[:16] not in exposed
