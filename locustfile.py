"""The toy store load for Locust users (Locust itself is not a dependency):

    locust -f locustfile.py --host http://127.0.0.1:8080 -u 5 -r 5 -t 60s --headless
    TOYSTORE_P=0.2 locust -f locustfile.py --host ...

Each Locust user is one simulated client with its own HTTP session (one
keep-alive connection). It queries a random toy; if the quantity is above 0 it
orders 1 to 3 units of it with probability TOYSTORE_P (0.5). When the user
stops it fetches every order it placed and checks name and quantity.
Request names in Locust's table: query, order, check. A sold-out refusal
(400) counts as a success; a mismatch fails the "check" request and makes the
run exit with status 1. `stratus load toystore` does the same without Locust."""
from __future__ import annotations

import os
import random

from locust import HttpUser, constant, events, task

try:
    from stratus.load_toystore import DEFAULT_TOYS as TOYS
except ImportError:  # Locust running outside the project's venv
    TOYS = ["Tux", "Fox", "Python", "Whale", "Elephant", "Dolphin", "Lego", "Yoyo", "Frisbee", "Marbles",
            "Kite", "Robot"]

P = float(os.environ.get("TOYSTORE_P", "0.5"))
MAX_UNITS = 3
MISMATCHES: list[str] = []


class ToyStoreUser(HttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.placed = []      # (number, name, quantity) as the service confirmed them
        self.max_lsn = 0

    def _lsn(self, resp):
        lsn = resp.headers.get("X-Stratus-LSN", "")
        if lsn.isdigit():
            self.max_lsn = max(self.max_lsn, int(lsn))

    @task
    def query_then_maybe_order(self):
        toy = random.choice(TOYS)
        with self.client.get(f"/products/{toy}", name="query", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                have = int(resp.json()["data"]["quantity"])
            except (ValueError, KeyError, TypeError):
                resp.failure("body without data.quantity")
                return
            self._lsn(resp)
        if have <= 0 or random.random() >= P:
            return
        units = random.randint(1, min(MAX_UNITS, have))
        with self.client.post("/orders", json={"name": toy, "quantity": units}, name="order",
                              catch_response=True) as resp:
            if resp.status_code == 200:
                try:
                    self.placed.append((resp.json()["data"]["order_number"], toy, units))
                except (ValueError, KeyError, TypeError):
                    resp.failure("200 without data.order_number")
                    return
                self._lsn(resp)
                resp.success()
            elif resp.status_code == 400:
                resp.success()  # sold out meanwhile: nothing was sold
            else:
                resp.failure(f"HTTP {resp.status_code}")

    def on_stop(self):
        headers = {"X-Stratus-Min-LSN": str(self.max_lsn)} if self.max_lsn else {}
        for number, name, units in self.placed:
            with self.client.get(f"/orders/{number}", name="check", headers=headers,
                                 catch_response=True) as resp:
                want = {"number": number, "name": name, "quantity": units}
                try:
                    got = resp.json().get("data") if resp.status_code == 200 else None
                except (ValueError, AttributeError):
                    got = None
                if got != want:
                    MISMATCHES.append(f"order {number}: expected {want}, got HTTP {resp.status_code} {got}")
                    resp.failure(MISMATCHES[-1])
                else:
                    resp.success()


@events.quitting.add_listener
def _exit_code(environment, **_kw):
    if MISMATCHES:
        print(f"{len(MISMATCHES)} order mismatches; first: {MISMATCHES[0]}")
        environment.process_exit_code = 1
