"""The synthetic clinic behind ``bastion demo``: fake patients whose PHI looks real to a machine.

Every value is made up, but each one is *valid* the way Bastion's recognizers check it (see
:mod:`bastion.policies.recognizers`): SSNs avoid the areas never issued (000, 666, 9xx), group 00,
serial 0000 and the published sample numbers; card numbers pass the Luhn check; phone numbers
follow the North American numbering plan, in the 555-01xx range set aside for fiction; e-mail
addresses use the domains reserved for examples; dates of birth are real dates. So a mask that
works on this data works on real data, and nothing here belongs to anyone.

The same seed gives the same clinic, byte for byte (:func:`generate` is pure), so a test can
regenerate it and look for any raw value that escaped masking. :func:`load` writes it into a
PostgreSQL database with COPY.
"""

from __future__ import annotations

import datetime
import random
from decimal import Decimal

import attrs

from bastion.policies.recognizers import luhn_valid, ssn_valid

DEFAULT_SEED = 20240917
# Enough patients that a bulk export passes the demo's rows_over review (1000 rows) three times
# over, few enough that generating and loading them takes well under a second.
DEFAULT_PATIENTS = 3000
VISITS_PER_PATIENT = (0, 4)  # inclusive range: some patients never came back
NOTE_PROBABILITY = 0.5  # about half the visits have a clinician's note
BILLING_PROBABILITY = 0.8  # most visits are billed
# Dates in the data are relative to this day, not to today, so the same seed always gives the
# same clinic.
REFERENCE_DAY = datetime.date(2025, 6, 30)
OLDEST_PATIENT_YEARS = 95
YOUNGEST_PATIENT_YEARS = 1
VISIT_HISTORY_DAYS = 3 * 365
# Fictional telephone numbers: 555-0100 to 555-0199 are reserved for fiction in every NANP area.
FICTIONAL_EXCHANGE = "555"
FICTIONAL_LINES = range(100, 200)
# Domains reserved for documentation (RFC 2606): mail to them reaches nobody.
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
# SSN areas that were never issued (000, 666, 900-999): we draw from the rest
SSN_AREAS = [area for area in range(1, 900) if area != 666]
CARD_PREFIX = "4"  # Visa-shaped: 16 digits, the last one a Luhn check digit
CARD_DIGITS = 16

FIRST_NAMES = (
    "Olivia", "Liam", "Emma", "Noah", "Amelia", "Oliver", "Ava", "Elijah", "Sophia", "Mateo",
    "Isabella", "Lucas", "Mia", "Levi", "Evelyn", "Asher", "Harper", "James", "Luna", "Leo",
    "Camila", "Grayson", "Gianna", "Ezra", "Elizabeth", "Luca", "Eleanor", "Ethan", "Ella",
    "Aiden", "Abigail", "Wyatt", "Sofia", "Sebastian", "Avery", "Benjamin", "Scarlett", "Mason",
    "Emily", "Henry", "Aria", "Hudson", "Penelope", "Jack", "Chloe", "Jackson", "Layla", "Owen",
    "Mila", "Daniel", "Nora", "Alexander", "Hazel", "Maverick", "Madison", "Kai", "Ellie",
    "Gabriel", "Lily", "Carter", "Nova", "William", "Isla", "Logan", "Grace", "Michael", "Violet",
    "Samuel", "Aurora", "Muhammad", "Riley", "Jose", "Zoey", "Wei", "Priya", "Aisha", "Kenji",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez",
    "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright",
    "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall",
    "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Chen", "Patel", "Kim", "Okafor",
    "Kowalski", "Schmidt", "Rossi", "Haddad", "Yamamoto", "O'Brien",
)  # fmt: skip
STREET_NAMES = (
    "Maple", "Oak", "Cedar", "Pine", "Elm", "Washington", "Lake", "Hill", "Park", "Main",
    "Sunset", "Highland", "Meadow", "River", "Church", "Spring", "Forest", "Willow", "Ridge",
)  # fmt: skip
STREET_KINDS = ("St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Ct", "Way")
# (city, state, NANP area code, first three ZIP digits): plausible combinations
PLACES = (
    ("Springfield", "IL", "217", "627"),
    ("Portland", "OR", "503", "972"),
    ("Austin", "TX", "512", "787"),
    ("Columbus", "OH", "614", "432"),
    ("Madison", "WI", "608", "537"),
    ("Raleigh", "NC", "919", "276"),
    ("Denver", "CO", "303", "802"),
    ("Albany", "NY", "518", "122"),
    ("Tucson", "AZ", "520", "857"),
    ("Boise", "ID", "208", "837"),
    ("Richmond", "VA", "804", "232"),
    ("Burlington", "VT", "802", "054"),
)
DEPARTMENTS = ("primary care", "cardiology", "dermatology", "endocrinology", "orthopedics", "pediatrics", "oncology", "radiology")
VISIT_REASONS = (
    "annual physical", "follow-up", "blood pressure check", "flu symptoms", "knee pain",
    "medication review", "skin rash", "diabetes management", "chest pain", "vaccination",
    "lab results", "back pain", "migraine", "allergy consult", "post-operative check",
)  # fmt: skip
CLINICIANS = ("Dr. Reyes", "Dr. Osei", "Dr. Lindqvist", "Dr. Tanaka", "NP Brennan", "PA Mensah", "Dr. Abboud")
# Clinicians write PHI into notes, which is why the baseline scans note columns. Each template
# holds values a free-text recognizer must find: SSNs with dashes, NANP phones, e-mail addresses,
# and dates of birth next to a keyword ("DOB"), as people write them.
NOTE_TEMPLATES = (
    "Patient called from {phone} to move the {department} appointment; identity confirmed with SSN {ssn} and DOB {dob}.",
    "Lab results sent to {email} at the patient's request. DOB {dob} verified at the front desk.",
    "Insurance form lists SSN {ssn}. Patient prefers {email} for portal messages.",
    "{reason}: improving. Follow up in two weeks; reach the patient at {phone} if the results are late.",
    "Pharmacy could not reach {first} at {phone}; left a message. Confirm DOB {dob} before the refill.",
)
BILLING_STATUSES = ("paid", "paid", "paid", "pending", "denied", "in collections")
BILLING_AMOUNT_CENTS = (2500, 95000)  # $25.00 to $950.00


@attrs.frozen
class Patient:
    id: int
    mrn: str
    first_name: str
    last_name: str
    date_of_birth: datetime.date
    ssn: str
    email: str
    phone: str
    street: str
    city: str
    state: str
    zip: str
    card_number: str


@attrs.frozen
class Visit:
    id: int
    patient_id: int
    visited_on: datetime.date
    department: str
    reason: str


@attrs.frozen
class Note:
    id: int
    visit_id: int
    patient_id: int
    author: str
    note: str


@attrs.frozen
class Invoice:
    id: int
    visit_id: int
    patient_id: int
    amount: Decimal
    card_number: str
    status: str


@attrs.frozen
class Clinic:
    seed: int
    patients: tuple[Patient, ...]
    visits: tuple[Visit, ...]
    notes: tuple[Note, ...]
    billing: tuple[Invoice, ...]

    def counts(self) -> dict[str, int]:
        return {"patients": len(self.patients), "visits": len(self.visits), "notes": len(self.notes), "billing": len(self.billing)}


# --- values --------------------------------------------------------------------------------------


def make_ssn(rng: random.Random) -> str:
    while True:
        ssn = f"{rng.choice(SSN_AREAS):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if ssn_valid(ssn.replace("-", "")):  # also skips the published sample numbers
            return ssn


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    for digit in "0123456789":
        if luhn_valid(payload + digit):
            return digit
    raise AssertionError("every payload has exactly one Luhn check digit")


def make_card(rng: random.Random) -> str:
    payload = CARD_PREFIX + "".join(rng.choice("0123456789") for _ in range(CARD_DIGITS - len(CARD_PREFIX) - 1))
    digits = payload + luhn_check_digit(payload)
    return " ".join(digits[i : i + 4] for i in range(0, CARD_DIGITS, 4))


def make_phone(rng: random.Random, area: str) -> str:
    return f"({area}) {FICTIONAL_EXCHANGE}-{rng.choice(FICTIONAL_LINES):04d}"


def _email_local(first: str, last: str) -> str:
    return "".join(ch for ch in f"{first}.{last}".lower() if ch.isalnum() or ch == ".")


def _birth_date(rng: random.Random) -> datetime.date:
    youngest = REFERENCE_DAY - datetime.timedelta(days=YOUNGEST_PATIENT_YEARS * 365)
    span = (OLDEST_PATIENT_YEARS - YOUNGEST_PATIENT_YEARS) * 365
    return youngest - datetime.timedelta(days=rng.randrange(span))


# --- the clinic ----------------------------------------------------------------------------------


def generate(seed: int = DEFAULT_SEED, patients: int = DEFAULT_PATIENTS) -> Clinic:
    """The whole clinic for ``seed``: the same seed and size always give the same rows."""
    rng = random.Random(seed)
    people: list[Patient] = []
    taken_emails: set[str] = set()
    for patient_id in range(1, patients + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        city, state, area, zip3 = rng.choice(PLACES)
        local = _email_local(first, last)
        email = f"{local}{rng.randint(1, 999)}@{rng.choice(EMAIL_DOMAINS)}"
        while email in taken_emails:  # one address per patient, as a real registry would insist
            email = f"{local}{rng.randint(1000, 99999)}@{rng.choice(EMAIL_DOMAINS)}"
        taken_emails.add(email)
        people.append(
            Patient(
                id=patient_id,
                mrn=f"MRN-{seed % 97:02d}{patient_id:06d}",
                first_name=first,
                last_name=last,
                date_of_birth=_birth_date(rng),
                ssn=make_ssn(rng),
                email=email,
                phone=make_phone(rng, area),
                street=f"{rng.randint(1, 9899)} {rng.choice(STREET_NAMES)} {rng.choice(STREET_KINDS)}",
                city=city,
                state=state,
                zip=f"{zip3}{rng.randint(0, 99):02d}",
                card_number=make_card(rng),
            )
        )
    visits: list[Visit] = []
    notes: list[Note] = []
    billing: list[Invoice] = []
    for patient in people:
        for _ in range(rng.randint(*VISITS_PER_PATIENT)):
            visit = Visit(
                id=len(visits) + 1,
                patient_id=patient.id,
                visited_on=REFERENCE_DAY - datetime.timedelta(days=rng.randrange(VISIT_HISTORY_DAYS)),
                department=rng.choice(DEPARTMENTS),
                reason=rng.choice(VISIT_REASONS),
            )
            visits.append(visit)
            if rng.random() < NOTE_PROBABILITY:
                text = rng.choice(NOTE_TEMPLATES).format(
                    phone=patient.phone,
                    ssn=patient.ssn,
                    dob=patient.date_of_birth.isoformat(),
                    email=patient.email,
                    first=patient.first_name,
                    department=visit.department,
                    reason=visit.reason.capitalize(),
                )
                notes.append(Note(len(notes) + 1, visit.id, patient.id, rng.choice(CLINICIANS), text))
            if rng.random() < BILLING_PROBABILITY:
                cents = rng.randint(*BILLING_AMOUNT_CENTS)
                billing.append(Invoice(len(billing) + 1, visit.id, patient.id, Decimal(cents).scaleb(-2), patient.card_number, rng.choice(BILLING_STATUSES)))
    return Clinic(seed, tuple(people), tuple(visits), tuple(notes), tuple(billing))


# --- the database --------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE patients (
    id            integer PRIMARY KEY,
    mrn           text NOT NULL UNIQUE,
    first_name    text NOT NULL,
    last_name     text NOT NULL,
    date_of_birth date NOT NULL,
    ssn           text NOT NULL,
    email         text NOT NULL,
    phone         text NOT NULL,
    street        text NOT NULL,
    city          text NOT NULL,
    state         text NOT NULL,
    zip           text NOT NULL,
    card_number   text NOT NULL
);
CREATE TABLE visits (
    id         integer PRIMARY KEY,
    patient_id integer NOT NULL REFERENCES patients,
    visited_on date NOT NULL,
    department text NOT NULL,
    reason     text NOT NULL
);
CREATE TABLE notes (
    id         integer PRIMARY KEY,
    visit_id   integer NOT NULL REFERENCES visits,
    patient_id integer NOT NULL REFERENCES patients,
    author     text NOT NULL,
    note       text NOT NULL
);
CREATE TABLE billing (
    id          integer PRIMARY KEY,
    visit_id    integer NOT NULL REFERENCES visits,
    patient_id  integer NOT NULL REFERENCES patients,
    amount      numeric(10, 2) NOT NULL,
    card_number text NOT NULL,
    status      text NOT NULL
);
"""
# table -> the row class whose fields are its columns, in the order they are loaded
TABLES: dict[str, type] = {"patients": Patient, "visits": Visit, "notes": Note, "billing": Invoice}


def load(conninfo: str, clinic: Clinic, *, app_role: str, app_password: str, database: str = "clinic") -> None:
    """Create ``database`` with the clinic's tables and rows, and the application's role.

    The role may read and write every table, billing included: that is the application's own
    credential, the one Bastion holds. What a *caller* may do is Bastion's policy, not the role's.
    ``conninfo`` is a superuser's connection to the cluster's ``postgres`` database.
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(app_role), sql.Literal(app_password)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER postgres").format(sql.Identifier(database)))
    clinic_conninfo = psycopg.conninfo.make_conninfo(conninfo, dbname=database)
    with psycopg.connect(clinic_conninfo) as conn:
        conn.execute(SCHEMA)
        for table, row_type in TABLES.items():
            columns = [field.name for field in attrs.fields(row_type)]
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
            with conn.cursor().copy(statement) as copy:
                for value in getattr(clinic, table):
                    copy.write_row(attrs.astuple(value))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(app_role)))
        conn.execute("ANALYZE")


def raw_identifiers(clinic: Clinic) -> dict[str, frozenset[str]]:
    """Every SSN, e-mail address, card number and phone number in the clinic, by kind: what must
    never leave Bastion unmasked."""
    return {
        "ssn": frozenset(p.ssn for p in clinic.patients),
        "email": frozenset(p.email for p in clinic.patients),
        "card": frozenset(p.card_number for p in clinic.patients),
        "phone": frozenset(p.phone for p in clinic.patients),
    }
