"""Entry points `flwr run` loads: fedrec's deployment ServerApp and ClientApp."""

from federation.deploy_app import make_deployment_client_app, make_deployment_server_app

serverapp = make_deployment_server_app()
clientapp = make_deployment_client_app()
