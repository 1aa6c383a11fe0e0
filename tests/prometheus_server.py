"""A real Prometheus (Debian's `prometheus`) on loopback scraping given targets, for tests."""

import json
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

from shardmesh.tp_group import free_port


class PrometheusServer:
    """Started with a generated config (scrape every 0.5 s); stopped (by pid) in `stop`."""

    def __init__(self, targets: list[str]):
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="shardmesh-prometheus-"))
        config = self.workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
                          "scrape_configs:\n  - job_name: shardmesh\n    static_configs:\n"
                          f"      - targets: {json.dumps(targets)}\n")
        self.port = free_port()
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API: the result vector ([] while Prometheus is not up yet)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = json.load(response)
        except OSError:
            return []
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict]:
        """Poll `promql` until its result is not empty (bounded by `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, (self.workdir / "prometheus.log").read_text()[-2000:]
            result = self.query(promql)
            if result:
                return result
            assert time.monotonic() < deadline, f"no result for {promql} after {timeout:.0f} s"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
