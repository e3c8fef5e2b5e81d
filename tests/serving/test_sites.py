"""Sites (issue 23, "Between sites"): two hospitals' nodes on one index, the SAME Accession
Number and Patient ID (+ issuer) at both. Each numbered finding is sent its input and must be
refused: (1) a study read or changed by its UID from the other site's node, (2) an order from
one hospital matching the other's study, (3) one hospital's admin reading the other's users and
audit. The same world runs on SQLite (unit) and on a real PostgreSQL (integration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from core.domain import ModelInfo, Priority, StudyStatus, TriageResult
from core.errors import DatasetMismatchError, InputError
from core.settings import Hl7Settings
from dicom_node.ingest import InstanceRecord
from ris.hl7_listener import handle_message
from ris.orders import Order, order_for_study
from store.index import Index, Instance, Study
from store.outbox import Channel, Kind, Message, enqueue
from store.results import update_result_columns
from tests.dicom_node.hl7_peers import index_study, omi_o23, orm_o01, segment
from tests.dicom_node.pg import postgresql_server  # noqa: F401  (the postgresql_url fixture)
from tests.serving.test_fhir import service_request
from tests.serving.workspace_helpers import PASSWORD, client
from workspace.accounts import Accounts
from workspace.audit import AuditTrail
from workspace.tables import Assessment, AuditEvent

A, B = "HOSP_A", "HOSP_B"
ACCESSION, PATIENT = "ACC001", "PAT001"  # the same at both hospitals


@dataclass
class TwoSites:
    index: dict[str, Index]
    uid: dict[str, str]
    app: dict[str, TestClient]
    token: dict[str, str]  # user -> bearer token

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token[user]}"}

    def close(self) -> None:
        for c in self.app.values():
            c.close()
        for index in self.index.values():
            index.close()


def _report(index: Index, uid: str, mr_file: Path) -> None:
    """Give the study a result and a document, as the node does after analysis."""
    result = TriageResult(
        study_instance_uid=uid,
        status=StudyStatus.REPORTED,
        priority=Priority.ROUTINE,
        case_likelihood=0.1,
        lesions=(),
        gland_volume_ml=35.0,
        model=ModelInfo(name="det", version="1", sha256="0" * 64),
        disclaimer="NOT FOR CLINICAL USE: demonstration model trained on synthetic data.",
    )
    with index.write() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.status = StudyStatus.REPORTED.value
        study.reported_at = 1795507300.0
        study.result_json = json.dumps(result.to_json_dict())
        study.documents_json = json.dumps([str(mr_file)])
        update_result_columns(s, study.id, result, 1795507300.0)


def two_sites(url: str, tmp_path: Path) -> TwoSites:
    index = {site: Index(url, node_id=site) for site in (A, B)}
    uid = {}
    for seed, site in enumerate((A, B)):
        uid[site] = index_study(
            index[site], tmp_path / site, patient_id=PATIENT, accession=ACCESSION, seed=seed
        )
        _report(index[site], uid[site], next((tmp_path / site).iterdir()))
    everyone = Accounts(index[A].engine)  # a tool: grants any site
    everyone.add_user("rita", "radiologist", PASSWORD, sites=[A, B])  # works at both
    everyone.add_user("adam_a", "admin", PASSWORD, sites=[A])
    everyone.add_user("adam_b", "admin", PASSWORD, sites=[B])
    everyone.add_user("ian", "integrator", PASSWORD, sites=[A, B])
    # a token is the user's: it acts at every site granted to them, and nowhere else
    token = {user: everyone.new_token(user) for user in ("rita", "adam_a", "adam_b", "ian")}
    app = {site: client(index[site]) for site in (A, B)}
    return TwoSites(index, uid, app, token)


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    world = two_sites(f"sqlite:///{tmp_path}/index.db", tmp_path)
    yield world
    world.close()


# --- 1: a study of another site is neither read nor changed by its UID (404) ---------------

STUDY_GETS = ("", "/assessment", "/decisions", "/images", "/sr", "/seg")
STUDY_POSTS = {
    "/acknowledge": None,
    "/reported": None,
    "/override": {"priority": "urgent", "reason": "clinical concern"},
    "/findings/0": {"decision": "accept"},
    "/pirads": {"pirads": 5},
    "/biopsy": {"isup_grade_group": 3, "biopsy_date": "20261201"},
}


def check_reads_and_writes_stay_in_their_site(w: TwoSites) -> None:
    b, rita = w.app[B], w.auth("rita")
    foreign, own = w.uid[A], w.uid[B]
    assert b.get(f"/api/studies/{own}", headers=rita).status_code == 200  # the control
    for tail in STUDY_GETS:
        r = b.get(f"/api/studies/{foreign}{tail}", headers=rita)
        assert (r.status_code, r.json()["detail"]) == (404, "no such study"), tail
    for tail, body in STUDY_POSTS.items():
        r = b.post(f"/api/studies/{foreign}{tail}", json=body, headers=rita)
        assert (r.status_code, r.json()["detail"]) == (404, "no such study"), tail
    with w.index[A].read() as s:  # nothing was written for A's study
        assert s.scalar(select(Assessment).where(Assessment.study_instance_uid == foreign)) is None
    assert b.post(f"/api/studies/{own}/acknowledge", headers=rita).status_code == 200
    # the worklist, FHIR and DICOMweb (QIDO, WADO) of B show B's study only
    rows = b.get("/api/worklist", headers=rita).json()["rows"]
    assert [r["study_instance_uid"] for r in rows] == [own]
    bundle = b.get(f"/fhir/DiagnosticReport?identifier={ACCESSION}", headers=rita).json()
    assert bundle["total"] == 1 and own in json.dumps(bundle) and foreign not in json.dumps(bundle)
    qido = b.get(f"/dicomweb/studies?AccessionNumber={ACCESSION}", headers=rita)
    assert qido.status_code == 200 and own in qido.text and foreign not in qido.text
    assert b.get(f"/dicomweb/studies?StudyInstanceUID={foreign}", headers=rita).json() == []
    for tail in ("", "/metadata", "/series"):
        assert b.get(f"/dicomweb/studies/{foreign}{tail}", headers=rita).status_code == 404, tail
    # an instance of A's study C-STOREd (or STOWed) to B is refused, not added to A's study
    with w.index[A].read() as s:
        (path,) = s.scalars(
            select(Instance.path)
            .join(Study, Instance.study_fk == Study.id)
            .where(Study.study_instance_uid == foreign)
            .limit(1)
        )
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID + ".9",
        sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.SeriesInstanceUID,
        study_instance_uid=foreign,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        path=Path(path),
        size_bytes=1,
        patient_id=PATIENT,
        modality="MR",
    )
    with pytest.raises(DatasetMismatchError):
        w.index[B].add_instance(record, 1795507400.0)
    # the outbox of an index without a node id (an HTTP-only app) shows its site's only
    with w.index[A].write() as s:
        message = Message(Channel.HL7, Kind.ORU, foreign, "ris", "MSG-A", node_id=A)
        enqueue(s, message, 1795507400.0)
    url = w.index[A].engine.url.render_as_string(hide_password=False)
    http_only = {site: Index(url, site_id=site) for site in (A, B)}
    assert [o["item_uid"] for o in http_only[A].outbox()] == ["MSG-A"]
    assert http_only[B].outbox() == []
    for index in http_only.values():
        index.close()
    # a user granted only A has no credential at B, by token or password
    assert b.get(f"/api/studies/{own}", headers=w.auth("adam_a")).status_code == 401
    login = b.post("/api/login", json={"name": "adam_a", "password": PASSWORD})
    assert login.status_code == 401


def test_finding_1_another_sites_study_is_404_on_every_route(sites: TwoSites) -> None:
    check_reads_and_writes_stay_in_their_site(sites)


# --- 2: an order matches only its own site's study ------------------------------------------


def check_orders_match_within_their_site(w: TwoSites) -> None:
    settings, now = Hl7Settings(), 1795507500.0
    # the same placer order number and accession at both hospitals: two orders, one per site
    ack_b = handle_message(w.index[B], orm_o01("B1", "PLC1", priority="S"), settings, now)
    ack_a = handle_message(w.index[A], orm_o01("A1", "PLC1", priority="R"), settings, now)
    assert segment(ack_b, "MSA")[1] == "AA" and segment(ack_a, "MSA")[1] == "AA"
    with w.index[A].read() as s:
        orders = {o.site_id: o for o in s.scalars(select(Order))}
        assert {site: o.study_instance_uid for site, o in orders.items()} == w.uid
        urgent_b = order_for_study(s, w.uid[B])
        routine_a = order_for_study(s, w.uid[A])
        urgency = dict(s.execute(select(Study.site_id, Study.referral_urgency)).all())
    assert urgent_b is not None and urgent_b.referral_urgency.value == "urgent"
    assert routine_a is not None and routine_a.referral_urgency.value == "routine"
    assert urgency == {A: "routine", B: "urgent"}  # B's urgent order did not touch A's study
    # an order at B naming A's Study Instance UID (IPC-3) reaches nothing of A's
    omi = omi_o23("B2", "PLC2", patient_id="NOBODY", accession="NONE", study_uid=w.uid[A])
    assert segment(handle_message(w.index[B], omi, settings, now), "MSA")[1] == "AA"
    with w.index[A].read() as s:
        still_a = order_for_study(s, w.uid[A])
    assert still_a is not None and still_a.placer_order_number == "PLC1"
    assert still_a.referral_urgency.value == "routine"
    # FHIR at B: same accession and patient, placer PLC3 -> B's study, never A's
    body = service_request("PLC3", priority="stat")
    r = w.app[B].post("/fhir/ServiceRequest", json=body, headers=w.auth("ian"))
    assert r.status_code == 201, r.text
    with w.index[A].read() as s:
        plc3 = s.scalars(select(Order).where(Order.placer_order_number == "PLC3")).one()
        assert (plc3.site_id, plc3.study_instance_uid) == (B, w.uid[B])


def test_finding_2_an_order_never_matches_another_sites_study(sites: TwoSites) -> None:
    check_orders_match_within_their_site(sites)


# --- 3: an admin sees only their site's users and audit --------------------------------------


def check_audit_and_users_stay_in_their_site(w: TwoSites) -> None:
    rita = w.auth("rita")
    assert w.app[A].get(f"/api/studies/{w.uid[A]}", headers=rita).status_code == 200
    override = {"priority": "urgent", "reason": "secret reason at A"}
    r = w.app[A].post(f"/api/studies/{w.uid[A]}/override", json=override, headers=rita)
    assert r.status_code == 200, r.text
    seen_b = w.app[B].get("/api/audit?limit=500", headers=w.auth("adam_b")).json()
    seen_a = w.app[A].get("/api/audit?limit=500", headers=w.auth("adam_a")).json()
    text_b = json.dumps(seen_b)
    leaked = [e for e in seen_b["events"] if w.uid[A] in json.dumps(e)]
    assert all(e["action"] in ("qido", "wado") for e in leaked), leaked  # B's own queries
    # what A's users did to A's study is not in B's list (B's own refused attempts may be)
    done_at_a = [
        e
        for e in seen_b["events"]
        if e["study_instance_uid"] == w.uid[A] and e["action"] in ("view_study", "override")
    ]
    assert not done_at_a
    assert "secret reason at A" not in text_b
    assert {e["site_id"] for e in seen_b["events"]} <= {B}
    assert any(e["study_instance_uid"] == w.uid[A] for e in seen_a["events"])
    assert {e["site_id"] for e in seen_a["events"]} == {A}
    by_uid = w.app[B].get(f"/api/audit?study={w.uid[A]}", headers=w.auth("adam_b")).json()
    assert {(e["site_id"], e["action"]) for e in by_uid["events"]} <= {(B, "qido"), (B, "wado")}
    # the audit rows carry their site, and the chain still verifies across sites
    with w.index[A].read() as s:
        sites_of_a = set(
            s.scalars(
                select(AuditEvent.site_id).where(
                    AuditEvent.study_instance_uid == w.uid[A],
                    AuditEvent.action.in_(("view_study", "override")),
                )
            )
        )
    assert sites_of_a == {A}
    check = AuditTrail(w.index[A].engine).verify()  # one chain; the site is in each hash
    assert check.ok and check.events >= 2, check
    # B's admin cannot even sign in at A, and B's accounts neither list nor manage A's users
    assert w.app[A].get("/api/audit", headers=w.auth("adam_b")).status_code == 401
    accounts_b = Accounts(w.index[B].engine, site_id=B)
    assert {u["name"] for u in accounts_b.list_users()} == {"rita", "adam_b", "ian"}
    assert all(u["sites"] == [B] for u in accounts_b.list_users())  # A's name never shown
    with pytest.raises(InputError):
        accounts_b.disable("adam_a")
    with pytest.raises(InputError):
        accounts_b.new_token("adam_a")
    # moving an event to another site breaks the chain: the site is in the event's hash
    with w.index[A].write() as s:
        s.execute(
            update(AuditEvent)
            .where(AuditEvent.study_instance_uid == w.uid[A], AuditEvent.action == "override")
            .values(site_id=B)
        )
    assert not AuditTrail(w.index[A].engine).verify().ok


def test_finding_3_an_admin_sees_only_their_sites_audit_and_users(sites: TwoSites) -> None:
    check_audit_and_users_stay_in_their_site(sites)


def test_a_single_site_needs_no_configuration(tmp_path: Path) -> None:
    """Without [site], the node's site is its node id (the AE title); `users add` grants it."""
    from core.settings import Settings

    settings = Settings()
    assert settings.site_id == settings.node_id == "RADTRIAGE"
    index = Index(f"sqlite:///{tmp_path}/i.db", node_id=settings.node_id)
    assert index.site_id == "RADTRIAGE"
    accounts = Accounts(index.engine, site_id=index.site_id)
    accounts.add_user("rita", "radiologist", PASSWORD)  # no --site: the node's
    assert accounts.check_password("rita", PASSWORD) is not None
    index.close()


@pytest.mark.integration
def test_two_sites_on_one_postgresql_share_nothing(postgresql_url: str, tmp_path: Path) -> None:
    """The issue's "done when": two nodes, one PostgreSQL, the same accession numbers; no
    read, write, order match or audit entry crosses."""
    world = two_sites(postgresql_url, tmp_path)
    try:
        check_reads_and_writes_stay_in_their_site(world)
        check_orders_match_within_their_site(world)
        check_audit_and_users_stay_in_their_site(world)
        with world.index[A].read() as s:
            patients = s.execute(select(Study.site_id, Study.patient_fk)).all()
        assert len({fk for _, fk in patients}) == 2  # the same MRN is a patient per site
    finally:
        world.close()


def test_users_add_grants_the_nodes_site_or_the_sites_named(tmp_path: Path, capsys) -> None:
    """`radtriage users add NAME --site S --site T`; without --site, the config's site."""
    import io
    import sys

    from cli.main import main

    config = tmp_path / "hosp_b.toml"
    config.write_text(
        f'[site]\nid = "NGH"\n[dicom]\nae_title = "HOSP_B"\n[storage]\nroot = "{tmp_path}"\n'
        f'database_url = "sqlite:///{tmp_path}/index.db"\n'
    )

    def add(*argv: str) -> dict[str, object]:
        stdin, sys.stdin = sys.stdin, io.StringIO("s3cret-pass-word\n")
        try:
            assert (
                main(["users", "add", *argv, "--password-stdin", "--json", "--config", str(config)])
                == 0
            )
        finally:
            sys.stdin = stdin
        return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]

    assert add("adam", "--role", "admin")["sites"] == ["NGH"]
    both = add("rita", "--role", "radiologist", "--site", "RLH", "--site", "NGH", "--site", "RLH")
    assert both["sites"] == ["RLH", "NGH"]
    index = Index(f"sqlite:///{tmp_path}/index.db")
    rlh = Accounts(index.engine, site_id="RLH")
    assert [u["name"] for u in rlh.list_users()] == ["rita"]  # adam is NGH's only
    assert rlh.check_password("adam", "s3cret-pass-word") is None
    assert rlh.check_password("rita", "s3cret-pass-word") is not None
    with pytest.raises(InputError):
        Accounts(index.engine).add_user("eve", "admin", "s3cret-pass-word", sites=["../x"])
    index.close()


def test_migration_0010_keeps_orders_and_users_and_the_first_node_adopts_them(
    tmp_path: Path,
) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from store.index import MIGRATIONS, make_engine

    url = f"sqlite:///{tmp_path}/index.db"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0009")
        connection.execute(
            text(
                "INSERT INTO orders (placer_order_number, placer_namespace, filler_order_number, "
                "accession_number, patient_id, issuer_of_patient_id, state, referral_urgency, "
                "suspected_cancer_pathway, clinical_details, source, message_control_id, "
                "changes, received_at, updated_at) VALUES ('PLC1', '', '', 'ACC001', 'PAT001', "
                "'', 'active', 'routine', 0, '', 'hl7', 'M1', 0, 1, 1)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO users (name, role, password_hash, disabled, created_at) "
                "VALUES ('old', 'admin', 'x', 0, 1)"
            )
        )
    engine.dispose()
    index = Index(url, node_id="HOSP_A")  # upgrades to head
    with index.read() as s:
        assert s.scalar(select(Order.site_id)) == ""
    assert Accounts(index.engine, site_id="HOSP_A").list_users() == []  # not granted yet
    index.adopt_unowned()
    with index.read() as s:
        assert s.scalar(select(Order.site_id)) == "HOSP_A"
    assert [u["name"] for u in Accounts(index.engine, site_id="HOSP_A").list_users()] == ["old"]
    # the same placer order number at another site is another order now
    other = Index(url, node_id="HOSP_B")
    ack = handle_message(other, orm_o01("B1", "PLC1"), Hl7Settings(), 2.0)
    other.close()
    assert segment(ack, "MSA")[1] == "AA"
    with index.read() as s:
        assert sorted(s.scalars(select(Order.site_id))) == ["HOSP_A", "HOSP_B"]
    index.close()
