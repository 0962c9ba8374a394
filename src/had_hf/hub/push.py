"""Pushing a distillation output folder to the Hugging Face Hub, and the `had-hf push` command.

`push_to_hub(output_dir, repo_id)` validates the folder, renders the card and the training-curve plot into a
temporary staging folder, and uploads everything in a single commit. The output folder is only read, never written,
so it is byte-identical after a failed push; a push that did not fully land raises `HubPushError` with the command
that retries it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from huggingface_hub.utils.sha import git_hash

from .card import write_card_files
from .output_dir import HubError, OutputDirError, check_output_dir, load_results

logger = logging.getLogger(__name__)


class HubPushError(HubError, RuntimeError):
    """A push did not land completely on the Hub. The local output folder is untouched.

    Attributes:
        step (`str`): what the push was doing when it failed (e.g. `"creating the commit"`).
        status_code (`int`, *optional*): the HTTP status the Hub answered, if it answered.
        retry_command (`str`): the `had-hf push` command that retries the push.
    """

    def __init__(self, message: str, *, step: str, retry_command: str, status_code: int | None = None):
        super().__init__(message)
        self.step = step
        self.retry_command = retry_command
        self.status_code = status_code


class _IncompleteCommitError(Exception):
    """The commit the Hub reported lacks files or holds different content."""


def check_repo_id(repo_id: str | None) -> str:
    """`repo_id` if it is a valid Hub model repo id with a namespace (`ORG/NAME`), else `OutputDirError`."""
    try:
        validate_repo_id(repo_id or "")
    except HFValidationError as error:
        raise OutputDirError(f"--repo-id {repo_id!r} is not a valid Hub repo id: {error}") from None
    if "/" not in repo_id:
        raise OutputDirError(f"--repo-id must be ORG/NAME (a user or organization, a slash, a name), got {repo_id!r}.")
    return repo_id


def retry_command(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
) -> str:
    """The `had-hf push` command that redoes a push with the same options (the token is left out: it is read from the
    environment)."""
    parts = ["had-hf", "push", str(output_dir), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if revision is not None:
        parts += ["--revision", revision]
    if license is not None:
        parts += ["--license", license]
    if commit_message is not None:
        parts += ["--commit-message", commit_message]
    return shlex.join(parts)


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    *,
    license: str | None = None,
) -> str:
    """Pushes a distillation output folder to the Hub in one commit, with its model card and training curves.

    The folder is validated first (see `check_output_dir`); the card and plot are rendered into a temporary
    staging folder, and the folder's own files are only read. Uploaded: the safetensors weights, `config.json`,
    tokenizer or image-processor files, `results.json`, `README.md` (the card) and `training_curves.png`; a
    `README.md` or `training_curves.png` already in the folder is replaced by the generated one, and other files
    (checkpoints, logs) stay local. After the commit, the repo's file list at that commit is checked against what
    was sent, so a push that landed partially is reported as a failure, never as a success.

    Args:
        output_dir (`str` or `Path`): the output folder of a distillation run.
        repo_id (`str`): the Hub repo, `ORG/NAME`; created if it does not exist.
        token (`str`, *optional*): a Hub token with write access; defaults to `HF_TOKEN` or the saved login.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its
            visibility).
        commit_message (`str`, *optional*): the commit's title.
        revision (`str`, *optional*): the branch to commit to (created from `main` if missing); defaults to `main`.
        license (`str`, *optional*): the model's license for the card (see `render_model_card`).

    Returns:
        `str`: the URL of the commit.

    Raises:
        `OutputDirError`: the folder cannot be pushed (nothing was sent).
        `HubPushError`: the Hub could not be reached, refused the token (401/403), failed (5xx), or the commit is
            incomplete. The message says which, and gives the command that retries.
    """
    output_dir = Path(output_dir)
    retry = retry_command(
        output_dir, repo_id, private=private, revision=revision, license=license, commit_message=commit_message
    )
    check_repo_id(repo_id)
    files = check_output_dir(output_dir)
    results = load_results(output_dir)
    with tempfile.TemporaryDirectory(prefix="had_hf_push_") as staging:
        generated = write_card_files(output_dir, staging, repo_id, license=license)
        generated_names = {path.name for path in generated}
        sources = [path for path in files if path.name not in generated_names] + generated
        message = commit_message or f"Upload HAD student of {results['teacher']['model_name_or_path']}"
        return _upload(repo_id, sources, token, private, message, revision, output_dir, retry)


def _upload(
    repo_id: str,
    sources: list[Path],
    token: str | None,
    private: bool,
    commit_message: str,
    revision: str | None,
    output_dir: Path,
    retry: str,
) -> str:
    """Creates the repo (and branch) and commits `sources` at the repo root; maps any failure to `HubPushError`."""
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files (one commit)"
        # `create_commit`, not `upload_folder`: with hf_xet installed, `upload_folder` may split a large folder into
        # several commits, and a failure between them would leave a half-pushed model on the branch.
        operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in sources]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        step = f"checking commit {commit.oid}"
        _verify_commit(api, repo_id, commit.oid, operations)
    except Exception as error:  # any failure: the user needs the same two facts, what failed and how to retry
        raise _push_error(error, step, api.endpoint, repo_id, output_dir, retry) from error
    logger.info("Pushed %s to %s: %s", output_dir, repo_id, commit.commit_url)
    return commit.commit_url


def _verify_commit(api: HfApi, repo_id: str, commit_oid: str, operations: list[CommitOperationAdd]) -> None:
    """Raises `_IncompleteCommitError` unless every uploaded file is in the commit with the same content.

    A successful commit answer is not proof enough: the Hub leaves out files its `.gitignore` rules match, and a
    commit could be cut short. Sizes and content hashes come from the tree listing (sha256 for LFS files, the git
    blob id for regular ones), so nothing is downloaded; the sha256 is the one the client computed to upload.
    """
    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, revision=commit_oid, recursive=True)}
    missing, different = [], []
    for operation in operations:
        entry = remote.get(operation.path_in_repo)
        if entry is None or not hasattr(entry, "size"):
            missing.append(operation.path_in_repo)
        elif not _same_content(operation, entry):
            different.append(operation.path_in_repo)
    if missing or different:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if different:
            details.append(f"different content in {different}")
        raise _IncompleteCommitError(
            f"the Hub reported commit {commit_oid} but it is incomplete: {'; '.join(details)}"
        )


def _same_content(operation: CommitOperationAdd, entry: Any) -> bool:
    size = operation.upload_info.size
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        return lfs.size == size and lfs.sha256 == operation.upload_info.sha256.hex()
    # regular (non-LFS) files are small: the Hub reports their git blob id
    return entry.size == size and entry.blob_id == git_hash(Path(operation.path_or_fileobj).read_bytes())


def _push_error(
    error: BaseException, step: str, endpoint: str, repo_id: str, output_dir: Path, retry: str
) -> HubPushError:
    status = error.response.status_code if isinstance(error, HfHubHTTPError) else None
    reason = _failure_reason(error, endpoint, repo_id)
    if isinstance(error, _IncompleteCommitError):
        outcome = "That commit is not a successful push; pushing again uploads what is missing or different."
    else:
        outcome = "The Hub confirmed no commit of these files, so nothing counts as pushed."
    message = (
        f"Pushing {output_dir} to {repo_id} failed while {step}: {reason}\n"
        f"{outcome} The local folder {output_dir} was not modified.\n"
        f"Retry with:\n    {retry}"
    )
    return HubPushError(message, step=step, retry_command=retry, status_code=status)


def _failure_reason(error: BaseException, endpoint: str, repo_id: str) -> str:
    """What went wrong, in words, from huggingface_hub's typed errors (a 401 comes as `RepositoryNotFoundError`
    too: the Hub does not tell a missing repo from a refused token, so the status decides)."""
    if isinstance(error, _IncompleteCommitError):
        return str(error) + "."
    if not isinstance(error, HfHubHTTPError):
        return f"could not complete the request to {endpoint} ({type(error).__name__}: {error})."
    status = error.response.status_code
    if status == 401:
        return (
            "the Hub rejected the token (HTTP 401). Pass a valid token with write access via --token or HF_TOKEN, "
            "or log in with `hf auth login`."
        )
    if status == 403:
        namespace = repo_id.split("/")[0]
        return f"the token may not write to {namespace!r} (HTTP 403). Use a token with write access to {namespace!r}."
    if isinstance(error, RevisionNotFoundError):
        return f"the Hub found no such branch in {repo_id} (HTTP {status})."
    if isinstance(error, RepositoryNotFoundError):
        return f"the Hub found no repository {repo_id} for this token (HTTP {status})."
    if status >= 500:
        return f"the Hub answered HTTP {status}, a server-side error; it is usually temporary."
    server_message = error.server_message or str(error).splitlines()[0]
    return f"the Hub answered HTTP {status}: {server_message}"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def run_push_command(args: argparse.Namespace) -> int:
    """Runs `had-hf push`: prints the commit URL and returns 0, or prints the error to stderr and returns 1."""
    try:
        url = push_to_hub(
            args.output_dir,
            args.repo_id,
            token=args.token,
            private=args.private,
            commit_message=args.commit_message,
            revision=args.revision,
            license=args.license,
        )
    except (HubError, ImportError) as error:  # ImportError: the `hub` extra (jinja2, matplotlib) is missing
        print(f"had-hf push: error: {error}", file=sys.stderr)
        if isinstance(error, ImportError):
            print("had-hf push needs the hub extra: pip install 'had-hf[hub]'", file=sys.stderr)
        return 1
    print(url)
    return 0
