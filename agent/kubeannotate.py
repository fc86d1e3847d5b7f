"""The agent's verdict on a Kubernetes pod (`ambit.dev/redirection: enabled`), written with a
JSON merge patch: the `PodAnnotator` of a real cluster (the local cluster edits YAML instead)."""

from __future__ import annotations

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ambit.cluster import Pod
from ambit.sources.kube import KubeError, describe_api_error


class KubePodAnnotator:
    """Writes agent-owned pod annotations with a JSON merge patch. Implements `PodAnnotator`."""

    def __init__(self, api_client: client.ApiClient, request_timeout: float = 10.0) -> None:
        self._core = client.CoreV1Api(api_client)
        self._timeout = request_timeout

    def set_annotation(self, pod: Pod, key: str, value: str | None) -> None:
        """Set `key` to `value` (None removes it) on the pod; raises KubeError naming the pod."""
        # merge-patch: a null value deletes the key, and only this key is touched.
        body = {"metadata": {"annotations": {key: value}}}
        try:
            # The answer (the whole pod) is not needed: skip decoding it into models.
            resp = self._core.patch_namespaced_pod(
                pod.name,
                pod.namespace,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self._timeout,
                _preload_content=False,
            )
            resp.release_conn()  # type: ignore[attr-defined]
        except ApiException as e:
            raise KubeError(describe_api_error(e, f"annotating pod {pod.key} with {key}")) from e
        except urllib3.exceptions.HTTPError as e:
            raise KubeError(describe_api_error(e, f"annotating pod {pod.key} with {key}")) from e
