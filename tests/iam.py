"""A moto server that enforces IAM: keys must exist, policies are evaluated, a role's trust
policy (and its sts:ExternalId condition) decides who may assume it.

moto lets every request through until told otherwise: the users, their keys and the roles
are made first, then ``/moto-api/reset-auth`` turns checking on for every later request.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tests.s3server import MotoServer
from vodpush.core.accounts import S3Settings

ACCOUNT = "123456789012"  # moto's account
# Assumable by the "vodpush" user with this external id; may do anything in S3.
UPLOADER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/uploader"
EXTERNAL_ID = "ext-good-0123"
# Trusts only the admin user: AssumeRole by "vodpush" is AccessDenied.
LOCKED_ROLE = f"arn:aws:iam::{ACCOUNT}:role/locked"
BUCKET = "iam-bucket"


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


@dataclass
class IamS3:
    server: MotoServer
    admin: tuple[str, str]  # may do anything
    service: tuple[str, str]  # sts:AssumeRole only: no S3 right of its own
    reader: tuple[str, str]  # reads S3, writes nothing

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, keys: tuple[str, str] | None, **overrides: Any) -> S3Settings:
        values: dict[str, Any] = {"endpoint_url": self.url, "region": "us-east-1"}
        if keys is not None:
            values["access_key_id"], values["secret_access_key"] = keys
        values.update(overrides)
        return S3Settings(**values)

    def client(self, service: str = "s3", keys: tuple[str, str] | None = None) -> Any:
        key_id, secret = keys or self.admin
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )


def start_iam_s3(log_dir: Path) -> IamS3:
    server = MotoServer(log_dir=log_dir).start()
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )

        def user(name: str, *statements: dict[str, Any]) -> tuple[str, str]:
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=_policy(*statements))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            return key["AccessKeyId"], key["SecretAccessKey"]

        admin = user("admin", {"Effect": "Allow", "Action": "*", "Resource": "*"})
        service = user("vodpush", {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"})
        reader = user(
            "reader",
            {
                "Effect": "Allow",
                "Action": ["s3:Get*", "s3:List*", "s3:HeadBucket"],
                "Resource": "*",
            },
        )
        trust_service = {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/vodpush"},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}},
        }
        trust_admin = {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/admin"},
            "Action": "sts:AssumeRole",
        }
        s3_all = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        for name, trust in (("uploader", trust_service), ("locked", trust_admin)):
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=_policy(trust))
            iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=_policy(s3_all))
        request = urllib.request.Request(
            f"{server.url}/moto-api/reset-auth",
            data=b"0",  # requests let through without checking from now on: none
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        iam_s3 = IamS3(server=server, admin=admin, service=service, reader=reader)
        iam_s3.client().create_bucket(Bucket=BUCKET)
        return iam_s3
    except BaseException:
        server.stop()
        raise
