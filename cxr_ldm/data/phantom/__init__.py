"""Procedural PA chest radiographs with radiology reports and CheXpert labels (the phantom data set).

cases.py     which findings a study has (the case model)
anatomy.py   the patient, the thorax and the film
findings.py  drawing each finding into the anatomy
reports.py   the report that states a case, and its labels
studies.py   `generate`: one study (image, report, labels); the visibility audit
cli.py       `python -m cxr_ldm.data.phantom`
"""
from cxr_ldm.data.phantom.studies import audit_visibility, generate, hidden_findings, render_image

__all__ = ["audit_visibility", "generate", "hidden_findings", "render_image"]
