"""`lambdafutures deploy | status | destroy | gc`: the AWS resources the "aws" backend runs on.

Modules, one job each:
- spec: settings, derived names and ARNs, IAM documents, the config file's contents (pure)
- package: the function zip (worker + cloudpickle); layer: the dependency layer (pip)
- aws: clients from one boto3 session, error helpers, the IAM-propagation retry policy
- resources: the inspect/ensure/delete interface; storage, iam, functions implement it
- stack: deploy/inspect/destroy over all resources; gc: leftovers of dead executors
- cli: argument parsing and printing
"""
