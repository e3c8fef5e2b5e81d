"""The one list of user roles, and the role sets routes are granted to.

- ``radiologist``: the worklist, study pages, images and the radiologist's read (acknowledge,
  override, findings, PI-RADS, biopsy);
- ``admin``: what a radiologist sees (not the read), operations (outbox, audit), and the
  integrations' routes;
- ``ml_engineer``: models and the outbox, no patient data;
- ``integrator``: a RIS or PACS token: FHIR orders and results, QIDO-RS, and STOW-RS when it
  is on; no worklist, no study pages, no radiologist's read.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    ML_ENGINEER = "ml_engineer"
    INTEGRATOR = "integrator"


ROLES: tuple[str, ...] = tuple(r.value for r in Role)
#: people who sign in to the web app
STAFF: tuple[str, ...] = (Role.RADIOLOGIST, Role.ADMIN, Role.ML_ENGINEER)
#: may see patient data in the web app
CLINICAL: tuple[str, ...] = (Role.RADIOLOGIST, Role.ADMIN)
#: the machine ways in (FHIR, DICOMweb): the clinical roles and integrator tokens
INTEGRATIONS: tuple[str, ...] = (Role.RADIOLOGIST, Role.ADMIN, Role.INTEGRATOR)
#: may store images (STOW-RS): integrator tokens and admins, never a radiologist session
UPLOADERS: tuple[str, ...] = (Role.INTEGRATOR, Role.ADMIN)
