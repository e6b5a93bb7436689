# The image deploy/base runs. Small on purpose: activator needs no GPU libraries.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY activator ./activator
RUN pip install --no-cache-dir . && useradd --uid 65532 --no-create-home activator
USER 65532
EXPOSE 8080
ENTRYPOINT ["activator"]
CMD ["serve", "--config", "/etc/activator/config.yaml"]
