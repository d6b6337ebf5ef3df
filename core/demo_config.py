"""The files ``bastion demo`` writes into its state directory: a configuration and a policy bundle.

They are ordinary Bastion files — the demo's gateway loads them the way ``bastion serve`` does, and
every command (``bastion sessions list -c <state>/bastion.toml``…) works on them — so a newcomer
can read them, change them, and keep them as the start of a real deployment. They are kept here as
text (rather than as files in examples/) so that ``bastion demo`` works from an installed wheel.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from pathlib import Path

import attrs

from bastion.policies.bundle import SHIPPED_BUNDLES_DIR

CONFIG_FILE = "bastion.toml"
BUNDLE_FILE = "clinic-demo.toml"  # its stem, "clinic-demo", prefixes the rule ids it defines
TOKENS_FILE = "tokens.toml"
UPSTREAM_PASSWORD_FILE = "clinic-db.password"
SIGNING_KEY_FILE = "audit-signing.key"
SIGNING_KEY_SEED_BYTES = 32  # an Ed25519 seed, written as 64 hex digits (audit.signing_key takes that)
BASELINE_BUNDLE = SHIPPED_BUNDLES_DIR / "hipaa-baseline.toml"
SECRET_FILE_MODE = 0o600

TARGET = "clinic-db"
DATABASE = "clinic"
APP_ROLE = "clinic_app"
CI_SUBJECT = "ci:nightly-extract"
CI_GROUP = "analytics-jobs"
REVIEWER_SUBJECT = "reviewer:dana"
REVIEWER_GROUP = "privacy-officers"  # the group the HIPAA baseline's reviews go to, too
# A result of more patient rows than this is an export, held for a privacy officer.
BULK_EXPORT_ROWS = 1000
# Masked rows kept per result for `bastion sessions replay`: enough to see what the caller saw,
# few enough that replaying a bulk export prints a screenful, not thousands of lines.
RECORDED_ROWS_PER_RESULT = 10

BUNDLE_TEXT = f"""\
# clinic-demo: who may do what in `bastion demo`, on top of the HIPAA baseline.
#
# hipaa-baseline.toml (loaded first) grants nothing: it refuses destructive statements, holds
# risky ones for review and masks PHI columns, for everyone. This bundle adds the grant of the
# nightly CI extract, a review of bulk patient exports, and a mask for card numbers.
# Rule ids are "clinic-demo:<section>:<name>"; the audit trail names them.

# Least privilege: the extract reads patients, visits and notes, and nothing else. The database
# role Bastion logs in with may read and write every table, billing included; what a caller gets
# is this grant, not the role.
[[grant]]
name = "nightly-extract"
description = "The nightly CI extract reads patients, visits and notes. Billing is not its business."
identities = {{ groups = ["{CI_GROUP}"] }}
targets = ["{TARGET}"]
statements = ["select"]
tables = ["public.patients", "public.visits", "public.notes"]

# A result that passes {BULK_EXPORT_ROWS} patient rows pauses there until a privacy officer approves;
# smaller results flow at once. The caller is told the approval request's id while it waits.
[[review]]
name = "bulk-patient-export"
description = "More than {BULK_EXPORT_ROWS} patient rows at once is an export: a privacy officer looks first."
when = {{ rows_over = {BULK_EXPORT_ROWS}, tables = ["public.patients"] }}
approvers = {{ groups = ["{REVIEWER_GROUP}"] }}
timeout = "10m"

# The baseline masks SSNs, e-mail, phones, dates of birth, MRNs, ZIPs and notes. Card numbers on
# file are not in it, so this bundle adds them: only the last four digits are shown.
[[mask]]
name = "payment-cards"
columns = ["*.card_number"]
strategy = "partial"
"""

CONFIG_TEMPLATE = """\
# Written by `bastion demo`: a gateway on embedded defaults (a file audit trail and SQLite
# approvals in this directory) in front of the demo's throwaway PostgreSQL.
#
#   bastion sessions list -c {config}
#   bastion audit verify -c {config}

[gateway]
state_dir = "."                      # the audit trail, approvals, keys: all in this directory
admin_listen = "127.0.0.1:0"         # any free port; the demo prints the one it got
policies = [
    # the guardrails and masks shipped with Bastion; it grants nothing
    {baseline},
    # who may do what here: the demo's grant, its review of bulk exports, a mask for cards
    "{bundle}",
]
shutdown_grace = "2s"                # the demo's sessions are its own: no need to wait long

[[identity]]
kind = "static-token"                # API keys minted with `bastion tokens add`
tokens_file = "{tokens}"

[[targets]]
name = "{target}"
protocol = "postgres"
listen = "127.0.0.1:0"
upstream = "{upstream}"
database = "{database}"
allow_plaintext_auth = true          # loopback only: anywhere else, configure tls
[targets.credentials]
user = "{role}"
password = {{ file = "{password_file}" }}   # the callers never see it

[audit]
record_rows = {recorded_rows}
signing_key = {{ file = "{signing_key_file}" }}   # signs each sealed segment of the trail
"""


@attrs.frozen
class StateFiles:
    """Where the demo's files are, once written."""

    directory: Path
    config: Path
    bundle: Path
    tokens: Path


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's too."""
    return json.dumps(text)


def _write_secret(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_state(directory: Path, *, upstream: str, app_password: str) -> StateFiles:
    """Write the configuration, the bundle, the upstream password and the audit signing key
    (both secrets in files only the owner reads) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / CONFIG_FILE
    bundle = directory / BUNDLE_FILE
    bundle.write_text(BUNDLE_TEXT, encoding="utf-8")
    _write_secret(directory / UPSTREAM_PASSWORD_FILE, app_password)
    _write_secret(directory / SIGNING_KEY_FILE, secrets.token_hex(SIGNING_KEY_SEED_BYTES))
    config.write_text(
        CONFIG_TEMPLATE.format(
            config=shlex.quote(str(config)),
            baseline=_toml_string(str(BASELINE_BUNDLE)),
            bundle=BUNDLE_FILE,
            tokens=TOKENS_FILE,
            target=TARGET,
            upstream=upstream,
            database=DATABASE,
            role=APP_ROLE,
            password_file=UPSTREAM_PASSWORD_FILE,
            recorded_rows=RECORDED_ROWS_PER_RESULT,
            signing_key_file=SIGNING_KEY_FILE,
        ),
        encoding="utf-8",
    )
    return StateFiles(directory, config, bundle, directory / TOKENS_FILE)
