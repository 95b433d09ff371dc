FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e .
# One actor per container; the command is set per service in compose.yaml.
CMD ["corral", "--help"]
