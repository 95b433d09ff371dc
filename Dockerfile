FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e .
# One failure domain per container (`corral up --domain NAME`); the command is set per
# service in compose.yaml. 9464: every process's metrics, summed (CORRAL_METRICS_PORT).
EXPOSE 9464
CMD ["corral", "--help"]
