# The Airflow image of the Helm chart (k8s/airflow/values.yaml): every Airflow component and the
# KubernetesExecutor's task pods. The DAG imports peflow at parse time and its tasks run the
# non-distributed stages in the pod and launch the distributed ones through TorchX, so it carries
# the locked stack (TorchX with the kubernetes client, MLflow, DVC with S3, GX, torch) and peflow.
# Build from the repo root:  docker build -f k8s/airflow.Dockerfile -t <registry>/peflow-airflow:<tag> .
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
USER airflow
# The lock pins apache-airflow 3.3.2 too, so this keeps the image's Airflow and sets the versions
# the tests run with; the image's own extras (postgres driver, FAB, amazon...) stay installed.
COPY --chown=airflow:0 requirements/lock.txt /opt/peflow/requirements/lock.txt
RUN pip install --no-cache-dir --no-deps -r /opt/peflow/requirements/lock.txt
COPY --chown=airflow:0 . /opt/peflow
RUN pip install --no-cache-dir --no-deps -e /opt/peflow \
    && python -c "import peflow.orchestration, torchx.schedulers.kubernetes_scheduler, mlflow, airflow.sdk"
ENV GX_ANALYTICS_ENABLED=False MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
    AIRFLOW__USAGE_DATA_COLLECTION__ENABLED=False
