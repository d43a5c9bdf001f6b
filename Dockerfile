# One image for every saga-es process (engine worker, relay, participants, db init).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY saga_es ./saga_es
COPY outbox_relay ./outbox_relay
COPY projections ./projections
COPY examples ./examples
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["saga-es"]
