"""docs/conformance.md stays true to what the listener negotiates."""

from __future__ import annotations

import re

from opmri_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from opmri_node.scp import STORAGE_TRANSFER_SYNTAXES, VERIFICATION, storage_contexts
from tests.node_fixtures import REPO_ROOT

DOC = (REPO_ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")


def _appendix(title: str) -> list[str]:
    section = DOC.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|[^|]+\| `([0-9.]+)` \|$", section, flags=re.MULTILINE)


def test_identification_matches_the_code() -> None:
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in DOC
    assert f"`{IMPLEMENTATION_VERSION_NAME}`" in DOC
    assert f"| Version | {__version__} |" in DOC


def test_sop_classes_and_transfer_syntaxes_match_the_listener() -> None:
    contexts = storage_contexts()
    storage = [str(cx.abstract_syntax) for cx in contexts if cx.abstract_syntax != VERIFICATION]
    listed = _appendix("Appendix A. Storage SOP classes accepted (SCP)")
    assert listed == storage and len(listed) == len(set(listed)) > 100
    assert _appendix("Appendix B. Transfer syntaxes accepted for storage") == list(
        STORAGE_TRANSFER_SYNTAXES
    )
    for cx in contexts:
        expected = 2 if cx.abstract_syntax == VERIFICATION else len(STORAGE_TRANSFER_SYNTAXES)
        assert len(cx.transfer_syntax) == expected


def test_statuses_and_reject_reasons_are_documented() -> None:
    for text in ("`0000` Success", "`A700` Refused", "`A900` Error", "`C000` Error",
                 "7 called-AE-title-not-recognized", "3 calling-AE-title-not-recognized",
                 "2 local-limit-exceeded"):
        assert text in DOC
