"""The operator's page's "Forget a person" form: POST /status/forget with the person's identifiers
shows what would be erased (a dry run) and a Confirm button; confirmed, it erases them as
`refiner-source forget` does and says how many events went. Behind the page's password and CSRF
token; the identifiers are never logged, and the page that says it is done does not repeat them."""

from __future__ import annotations

from flask import render_template, request

from refiner_source.directions import DIRECTIONS
from refiner_source.erasure import NoKey, erase
from refiner_source.ops.status_page import _check_admin, _check_csrf, _helpers, _stop, operator_bp
from refiner_source.privacy import ANONYMOUS, EMAIL, USER, person_of
from refiner_source.web.state import state

MAX_IDENTIFIER_LENGTH = 2000  # the form's fields; the command takes any length
FIELDS = (
    (USER, "user id", "Segment's userId, Refiner's contact remote_id"),
    (EMAIL, "email", "any case"),
    (ANONYMOUS, "anonymous id", "Segment's anonymousId, or a Refiner contact's uuid"),
)


@operator_bp.post("/status/forget")
def forget_person():
    """Without `confirm`: the counts of what would be erased, and the Confirm button. With it: erased."""
    _check_admin()
    _check_csrf()
    given = {kind: (request.form.get(kind) or "").strip() for kind, _, _ in FIELDS}
    if any(len(value) > MAX_IDENTIFIER_LENGTH for value in given.values()):  # cut, it would name someone else
        _stop(400, "too_long", f"An identifier is longer than {MAX_IDENTIFIER_LENGTH} characters: use `refiner-source forget`.")
    person = frozenset(person_of(given.items()))
    if not person:
        _stop(400, "no_identifier", "Give the person's user id, email or anonymous id: reload /status and fill in the form.")
    confirmed = request.form.get("confirm") == "1"
    app_state = state()
    try:
        erased = erase(app_state.outbox, app_state.settings, person, dry_run=not confirmed)
    except NoKey as exc:
        _stop(409, "no_key", str(exc))
    return render_template(
        "forget.html",
        confirmed=confirmed,
        given=given,
        fields=FIELDS,
        erased=[(DIRECTIONS[d].title, e) for d, e in erased.items()],
        total=sum(e.events for e in erased.values()),
        **_helpers(),
    )
