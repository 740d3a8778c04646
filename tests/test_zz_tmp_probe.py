import base64, json, threading
import pytest
from local.fake_fcm import FakeFcm
from shared import delivery, instance

def test_probe(env, monkeypatch):
    fake = FakeFcm(); fake.start()
    monkeypatch.setenv("FCM_ENDPOINT", fake.url); monkeypatch.setenv("FCM_MAX_IN_FLIGHT", "10")
    instance.reset()
    st = instance.token_store()
    for i in range(60):
        st.register("u", f"t-{i}")
    payload = {"version": 1, "id": "probe", "user_ids": ["u"], "notification": {"title": "x"}}
    ev = {"message": {"data": base64.b64encode(json.dumps(payload).encode()).decode(), "messageId": "1"}}
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", delivery.handle(ev)), daemon=True)
    t.start(); t.join(timeout=10)
    print("ALIVE", t.is_alive(), out, len(fake.messages()))
