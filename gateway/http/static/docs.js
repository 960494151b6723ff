// Starts the vendored Swagger UI on the gateway's own OpenAPI description (no external URL:
// the online validator badge is off, and keys are not persisted in the browser).
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
