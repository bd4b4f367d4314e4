from carehub.hl7.ack import read_ack
from carehub.testing import HubThread, make_adt, mllp_exchange


def test_good_message_is_stored_and_acked(hub: HubThread) -> None:
    answers = mllp_exchange(hub.mllp_address, [make_adt("C1").encode()])
    code, control_id, _ = read_ack(answers[0].decode())
    assert (code, control_id) == ("AA", "C1")
    stored = hub.store.find()
    assert [m.control_id for m in stored] == ["C1"]
    assert stored[0].patient_id == "P0001" and stored[0].patient_authority == "HOSP"
