"""A real SMTP server on 127.0.0.1 for the tests (aiosmtpd). Every message it receives is parsed
with Python's email package and stored as <dir>/<time>.json (from, to, subject, message_id, text,
html), so a test can read back exactly what a mail client would show.

usage: smtp_server.py PORT DIR    (prints "ready" once it accepts connections)
"""
import email
import email.policy
import json
import pathlib
import sys
import time

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, folder):
        self.folder = pathlib.Path(folder)

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        text = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        record = {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "subject": str(message["subject"]),
            "message_id": str(message["message-id"]),
            "text": text.get_content() if text else None,
            "html": html.get_content() if html else None,
        }
        name = f"{time.time_ns()}"
        temp = self.folder / f".{name}.tmp"
        temp.write_text(json.dumps(record))
        temp.rename(self.folder / f"{name}.json")
        return "250 OK"


def main():
    port, folder = int(sys.argv[1]), sys.argv[2]
    controller = Controller(Store(folder), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        controller.stop()


if __name__ == "__main__":
    main()
