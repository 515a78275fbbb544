"""A stand-in for trainpilot_trainer: same environment, files, metrics and exit codes, no torch.

Behaviour comes from the trial config and a few FAKE_* environment variables (set through
trialTemplate.env): FAKE_STEP_SECONDS, FAKE_EXIT (exit with this code after FAKE_EXIT_AFTER
steps), FAKE_IGNORE_TERM, FAKE_LINGER, FAKE_NO_SERVER, FAKE_METRICS_PATH (serve metrics there only, 404
elsewhere; by default on every path). An lr of 1 or more diverges at step 20.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

config = json.load(open(os.environ["TRAINPILOT_TRIAL_CONFIG"]))
hp = config["hyperparameters"]
lr = float(hp.get("lr", 1e-3))
max_steps = int(hp.get("max_steps", 300))
eval_interval = int(hp.get("eval_interval", 50))
checkpoint_interval = int(hp.get("checkpoint_interval", 0))
step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.005"))
linger = float(os.environ.get("FAKE_LINGER", "0.3"))
metrics_path = os.environ.get("FAKE_METRICS_PATH")
floor = 1.25
state = {"step": 0, "train": float("nan"), "val": float("nan"), "nonfinite": 0, "ckpt": -1, "lr": lr, "gen": 0}

with open("env.json", "w") as handle:
    json.dump(
        {k: v for k, v in os.environ.items() if k.startswith(("TRAINPILOT_", "CUDA_", "OMP_", "DS_", "FAKE_"))}, handle
    )

resume = config.get("resume_from")
if resume and os.path.exists(os.path.join(resume, "latest")):
    state["step"] = int(open(os.path.join(resume, "latest")).read().split()[0])
    print(f"resumed from {resume} at step {state['step']}", flush=True)


def exposition() -> bytes:
    lines = [
        f"trainpilot_step {state['step']}",
        f"trainpilot_train_loss {state['train']}",
        f"trainpilot_val_loss {state['val']}",
        f"trainpilot_learning_rate {state['lr']}",
        f"trainpilot_nonfinite_loss_total {state['nonfinite']}",
        f"trainpilot_checkpoint_step {state['ckpt']}",
        f"trainpilot_loss_floor {floor}",
        f"trainpilot_max_steps {max_steps}",
        f"trainpilot_control_generation {state['gen']}",
    ]
    return ("\n".join(lines) + "\n").encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if metrics_path and self.path.split("?")[0] != metrics_path:
            self.send_error(404)
            return
        body = exposition()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if not os.environ.get("FAKE_NO_SERVER"):
    server = ThreadingHTTPServer(
        (os.environ["TRAINPILOT_METRICS_ADDR"], int(os.environ["TRAINPILOT_METRICS_PORT"])), Handler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()


def checkpoint() -> None:
    folder = config.get("checkpoint_dir")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "latest"), "w") as handle:
            handle.write(f"{state['step']}\n")
        state["ckpt"] = state["step"]


def finish(code: int) -> None:
    result = {
        "trial": config["trial"],
        "step": state["step"],
        "train_loss": state["train"],
        "val_loss": state["val"],
        "nonfinite_loss_total": state["nonfinite"],
        "checkpoint_step": state["ckpt"],
        "exit_code": code,
    }
    time.sleep(linger)
    print("TRAINPILOT_RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(code)


stopping = threading.Event()
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

exit_code = int(os.environ.get("FAKE_EXIT", "-1"))
exit_after = int(os.environ.get("FAKE_EXIT_AFTER", "3"))
print(f"fake trainer {config['trial']} lr={lr} starting at step {state['step']}", flush=True)
while state["step"] < max_steps:
    if stopping.is_set():
        checkpoint()
        print("stopped by SIGTERM after checkpoint", flush=True)
        finish(4)
    try:
        control = json.load(open(config["control_file"])) if config.get("control_file") else {}
        if control.get("generation", 0) > state["gen"]:
            state["gen"] = control["generation"]
            state["lr"] = control.get("lr") or state["lr"]
    except (OSError, ValueError):
        pass
    state["step"] += 1
    step = state["step"]
    if lr >= 1.0 and step >= 20:
        state["train"] = float("nan")
        state["nonfinite"] += 1
        print("non-finite loss: diverged", flush=True)
        finish(3)
    state["train"] = floor + 1.5 * math.exp(-step * min(lr, 0.05) * 2) + (0.4 if lr >= 1.0 else 0.0) * step / 20
    if step % eval_interval == 0 or step == max_steps:
        state["val"] = state["train"] + 0.05
    if checkpoint_interval and step % checkpoint_interval == 0:
        checkpoint()
    if exit_code >= 0 and step >= exit_after:
        finish(exit_code)
    time.sleep(step_seconds)
finish(0)
