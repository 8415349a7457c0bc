# The MLflow tracking server image (k8s/mlflow.yaml): MLflow at the lock's version, with boto3 for
# the S3 artifact store and psycopg2 for the Postgres backend store (the official MLflow image has
# no Postgres driver). Build from the repo root:
#   docker build -f k8s/mlflow.Dockerfile -t <registry>/peflow-mlflow:<tag> .
FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mlflow
COPY requirements/lock.txt /tmp/lock.txt
# -c: MLflow and its dependencies at the lock's versions; psycopg2-binary is not in the lock.
RUN pip install --no-cache-dir -c /tmp/lock.txt mlflow boto3 psycopg2-binary==2.9.13 \
    && rm /tmp/lock.txt
ENV MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
