"""What the example webhook (tests/fixtures/webhook_completed_survey.json) must become in Segment."""

IDENTIFY_TRAITS = {
    "refiner_what_is_your_job_role": "Product Manager",
    "refiner_how_likely_are_you_to_recommend_us": "8",
    "refiner_email": "ada@initech.example",
}
GROUP_TRAITS = {"refiner_name": "Initech", "refiner_plan": "enterprise", "refiner_employee_count": "250-1000"}
TRACK_PROPERTIES = {
    "survey_id": "0d94c790-401c-11ef-bb27-e31f68320006",
    "survey_name": "Onboarding check-in",
    "response_id": "a3e1c2f0-a5d1-11ef-b050-03a44b320007",
    "completed_at": "2026-11-18T16:42:57+00:00",
    "tags": [],
    "refiner_what_is_your_job_role": "Product Manager",
    "refiner_employee_count": "250-1000",
    "refiner_how_likely_are_you_to_recommend_us": "8",
}
