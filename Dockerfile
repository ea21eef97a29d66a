# One image for every role: dispatcher, worker, mock-upstream (and the CLI).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY dispatcher dispatcher
COPY workers workers
COPY ratefleet ratefleet
RUN pip install --no-cache-dir .
# compose.yaml and the README run `submit /app/examples/jobs.jsonl`; configs live here too
COPY examples examples
ENV RATEFLEET_LOG_FORMAT=json
ENTRYPOINT ["ratefleet"]
