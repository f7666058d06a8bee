"""Where a step runs: GPU node pool, accelerators, model cache and Secrets, all from pipeline parameters.

Nothing here is a literal of the cluster: node selector, tolerations, accelerator type and count, the
PVC and the Secret names are pipeline parameters whose defaults match the Helm chart's values.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from subjectops.kfp_pod import MODEL_CACHE_MOUNT

# GPU nodes are preemptible: a GPU step that fails is retried after 1, 2, 4 minutes (finetune resumes from the
# checkpoint it wrote on SIGTERM, on the model-cache volume); a real bug fails 3 more times, within the hour.
GPU_RETRIES = 3
GPU_RETRY_BACKOFF = "60s"
GPU_RETRY_BACKOFF_FACTOR = 2.0
GPU_RETRY_MAX_DURATION = "3600s"
# Secret key -> environment variable. The chart's Secrets hold exactly these keys.
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
# The pod label the chart's MLflow NetworkPolicy admits (charts/subjectops/templates/networkpolicies.yaml).
MLFLOW_CLIENT_LABEL = "subjectops.io/mlflow-client"
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
}

# Defaults of the placement parameters (the chart's values.yaml has the same).
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
DEFAULT_MODEL_CACHE_PVC = "subjectops-model-cache"
DEFAULT_MLFLOW_SECRET = "subjectops-mlflow"
DEFAULT_S3_SECRET = "subjectops-s3"


def with_mlflow(task: PipelineTask, mlflow_secret) -> PipelineTask:
    """MLflow's credentials, and the label the chart's NetworkPolicy admits to MLflow: a pod without it cannot
    connect."""
    kubernetes.add_pod_label(task, label_key=MLFLOW_CLIENT_LABEL, label_value="true")
    return kubernetes.use_secret_as_env(task, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS)


def with_object_store(task: PipelineTask, s3_secret) -> PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)


def on_gpu(task: PipelineTask, *, accelerator_type, gpu_count, node_selector, tolerations,
           model_cache_pvc, mlflow_secret, s3_secret) -> PipelineTask:
    """Put a step on the GPU node pool with the model cache, the credentials it needs and a retry policy."""
    task.set_retry(num_retries=GPU_RETRIES, backoff_duration=GPU_RETRY_BACKOFF,
                   backoff_factor=GPU_RETRY_BACKOFF_FACTOR,
                   backoff_max_duration=GPU_RETRY_MAX_DURATION)
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(gpu_count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.mount_pvc(task, pvc_name=model_cache_pvc, mount_path=MODEL_CACHE_MOUNT)
    with_mlflow(task, mlflow_secret)
    with_object_store(task, s3_secret)
    return task
