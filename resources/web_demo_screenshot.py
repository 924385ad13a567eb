"""Makes the README's pictures of the web demo: resources/web-demo.png and an animated resources/web-demo.gif of a
question being typed and its reply streaming in.

    python resources/web_demo_screenshot.py [--model-path DIR] [--out resources]

Starts web_demo.py on a free loopback port (with --model-path when given, else the demo checkpoint, whose replies
are gibberish), chats in headless Chromium (Debian's /usr/bin/chromium through Playwright) and saves the images.
"""
import argparse
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
QUESTIONS = ["Hello! What can you do?", "Write a Python function that adds two numbers."]


def start_server(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "web_demo.py"), "--port", str(port)]
    if model_path:
        cmd += ["--model-path", model_path]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600  # real weights take a while to load
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"web_demo.py did not start serving {url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="weights to chat with (default: the demo checkpoint)")
    parser.add_argument("--out", default=str(ROOT / "resources"), help="folder for web-demo.png and web-demo.gif")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    proc, url = start_server(args.model_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(url)
            box = page.locator("#query textarea")
            box.wait_for()
            number = page.locator("#max-length input[type=number]")
            number.fill("320")  # replies of a few lines keep the picture readable
            number.press("Enter")
            top, bottom = page.locator("#chatbot").bounding_box(), page.locator("#query").bounding_box()
            clip = dict(x=top["x"], y=top["y"], width=top["width"],  # the animation films the chat and the box
                        height=bottom["y"] + bottom["height"] - top["y"])
            frames = []

            def film():
                frames.append(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"))

            for question in QUESTIONS:
                n_replies = page.locator('#chatbot [data-testid="bot"]').count()
                for start in range(0, len(question), 4):
                    box.press_sequentially(question[start:start + 4])
                    film()
                box.press("Enter")
                # film the page until the reply has stopped growing for a second
                reply = page.locator('#chatbot [data-testid="bot"]').nth(n_replies)
                reply.wait_for()
                last_text, still_since = None, time.time()
                while time.time() - still_since < 1.0:
                    text = reply.inner_text()
                    if text != last_text:
                        film()
                        last_text, still_since = text, time.time()
                    time.sleep(0.02)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "web-demo.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    small = [f.resize((f.width * 2 // 3, f.height * 2 // 3)).quantize(colors=64) for f in frames[:200]]
    durations = [120] * (len(small) - 1) + [2000]  # hold the finished conversation before looping
    small[0].save(out / "web-demo.gif", save_all=True, append_images=small[1:], duration=durations, loop=0,
                  optimize=True)
    print(f"wrote {out / 'web-demo.png'} and {out / 'web-demo.gif'} ({len(small)} frames)")


if __name__ == "__main__":
    main()
